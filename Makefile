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

# ruff first: a lint failure stops before minutes of tests.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# Synthetic SSv2-layout clips -> train and validation stores built with the tiny teacher ->
# verified -> preflight -> the tiny student trained on CPU (a new run folder under demo/runs/
# each time) -> salt-train eval: its table beside the random-init student and the teacher.
# Rerunning resumes the builds: the data and committed shards are kept.
DATA := $(DEMO)/ssv2-demo
demo: $(STAMP)
	test -d $(DATA) || $(BIN)/salt-cache demo-data --out $(DATA) --train 96 --validation 64
	$(BIN)/salt-cache build --src $(DATA) --pipeline demo
	$(BIN)/salt-cache build --src $(DATA) --pipeline demo --split validation --out $(DATA)/latents-val.zarr
	$(BIN)/salt-cache verify $(DATA)/latents.zarr --deep 2
	$(BIN)/salt-cache verify $(DATA)/latents-val.zarr
	$(BIN)/salt-train preflight --cache $(DATA)/latents.zarr --pipeline demo --batches 20
	run=$(DEMO)/runs/demo-$$(date +%Y%m%d-%H%M%S) && \
	$(BIN)/salt-train run --cache $(DATA)/latents.zarr --pipeline demo --run-dir $$run && \
	$(BIN)/salt-train eval $$run --val-cache $(DATA)/latents-val.zarr --teacher builtin:tiny-videomae

bench: $(STAMP)
	test -d $(DEMO)/bench || $(BIN)/salt-cache demo-data --out $(DEMO)/bench --train 128 --validation 0 --test 0
	$(BIN)/salt-cache bench --src $(DEMO)/bench --clips 128 --workers 2 --batch-size 4
	$(BIN)/salt-cache build --src $(DEMO)/bench --pipeline demo
	$(BIN)/salt-train bench --cache $(DEMO)/bench/latents.zarr --pipeline demo

clean-demo:
	rm -rf $(DEMO)
