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

# Synthetic SSv2-layout clips -> a pixels-only train store -> SALT's stage 1: a tiny teacher trained on
# them by pixel reconstruction (CPU, demo/teacher/) -> the train store's latents filled in with it (no
# second decode) and the validation store built with it -> verified -> preflight -> the tiny student
# trained on CPU (a new run folder under demo/runs/ each time) -> salt-train eval: its table beside the
# random-init student and the teacher. Rerunning resumes: the data, the teacher and committed shards are kept.
DATA    := $(DEMO)/ssv2-demo
TEACHER := $(DEMO)/teacher
demo: $(STAMP)
	test -d $(DATA) || $(BIN)/salt-cache demo-data --out $(DATA) --train 96 --validation 64
	$(BIN)/salt-cache build --src $(DATA) --pipeline demo --pixels-only --out $(DATA)/pixels.zarr
	test -f $(TEACHER)/summary.json || $(BIN)/salt-train teacher --cache $(DATA)/pixels.zarr --pipeline demo \
		--run-dir $(TEACHER) $$(test -f $(TEACHER)/config.yaml && echo --resume)
	$(BIN)/salt-cache build --from-store $(DATA)/pixels.zarr --teacher $(TEACHER)/export --pipeline demo \
		--out $(DATA)/latents-stage1.zarr
	$(BIN)/salt-cache build --src $(DATA) --pipeline demo --split validation --teacher $(TEACHER)/export \
		--out $(DATA)/latents-stage1-val.zarr
	$(BIN)/salt-cache verify $(DATA)/latents-stage1.zarr --deep 2
	$(BIN)/salt-cache verify $(DATA)/latents-stage1-val.zarr
	$(BIN)/salt-train preflight --cache $(DATA)/latents-stage1.zarr --pipeline demo --batches 20
	run=$(DEMO)/runs/demo-$$(date +%Y%m%d-%H%M%S) && \
	$(BIN)/salt-train run --cache $(DATA)/latents-stage1.zarr --pipeline demo --run-dir $$run && \
	$(BIN)/salt-train eval $$run --val-cache $(DATA)/latents-stage1-val.zarr --teacher $(TEACHER)/export

bench: $(STAMP)
	test -d $(DEMO)/bench || $(BIN)/salt-cache demo-data --out $(DEMO)/bench --train 128 --validation 0 --test 0
	$(BIN)/salt-cache bench --src $(DEMO)/bench --clips 128 --workers 2 --batch-size 4
	$(BIN)/salt-cache build --src $(DEMO)/bench --pipeline demo
	$(BIN)/salt-train bench --cache $(DEMO)/bench/latents.zarr --pipeline demo

clean-demo:
	rm -rf $(DEMO)
