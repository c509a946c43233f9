# Two entry points: `make demo` (the main job on built-in demo data) and `make test`.
# Each creates .venv with `pip install -e '.[dev]'` when it is missing or stale.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo

.PHONY: demo test bench venv clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Synthetic SSv2-layout clips -> store built with the tiny teacher -> verified ->
# preflight -> the tiny student trained on CPU (a new run folder under demo/runs/ each time).
# Rerunning resumes the build: the data and committed shards are kept.
demo: $(STAMP)
	test -d $(DEMO)/ssv2 || $(BIN)/salt-cache demo-data --out $(DEMO)/ssv2
	$(BIN)/salt-cache build --src $(DEMO)/ssv2 --pipeline demo
	$(BIN)/salt-cache verify $(DEMO)/ssv2/latents.zarr --deep 2
	$(BIN)/salt-train preflight --cache $(DEMO)/ssv2/latents.zarr --pipeline demo --batches 20
	$(BIN)/salt-train run --cache $(DEMO)/ssv2/latents.zarr --pipeline demo --run-dir $(DEMO)/runs/demo-$$(date +%Y%m%d-%H%M%S)

bench: $(STAMP)
	test -d $(DEMO)/bench || $(BIN)/salt-cache demo-data --out $(DEMO)/bench --train 128 --validation 0 --test 0
	$(BIN)/salt-cache bench --src $(DEMO)/bench --clips 128 --workers 2 --batch-size 4
	$(BIN)/salt-cache build --src $(DEMO)/bench --pipeline demo
	$(BIN)/salt-train bench --cache $(DEMO)/bench/latents.zarr --pipeline demo

clean-demo:
	rm -rf $(DEMO)
