# Two entry points: `make demo` (the main job on built-in demo data) and `make test`.
# Each creates .venv with `pip install -e '.[dev]'` when it is missing or stale.
# `make gpu-check` (DRY=1: on CPU, tiny) measures a lent GPU; `make wheelhouse` readies it for a machine without network.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo

.PHONY: demo test bench venv clean-demo gpu-check wheelhouse

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# ruff and mypy first: a format, lint or type error stops before minutes of tests.
test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
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

# Every figure a lent one-GPU machine should give, within 9 minutes (benchmarks/gpu_check.py): gpu-check/gpu-check.json
# and gpu-check/summary.md. DRY=1: the same steps on CPU at tiny sizes. Without network: a missing venv is made from
# wheelhouse/ (see `wheelhouse`) on top of the machine's own packages (its torch), else the normal install.
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	@if [ ! -x $(BIN)/python ] && [ -d $(WHEELHOUSE) ]; then \
		$(PYTHON) -m venv --system-site-packages $(VENV) && \
		$(BIN)/python -m pip install -q --no-index --find-links $(WHEELHOUSE) -e . && touch $(STAMP); \
	else $(MAKE) --no-print-directory venv; fi
	$(BIN)/python benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(DRY),--dry)

# Wheels of this venv's dependencies (pinned by pip freeze) for a machine without network, in wheelhouse/ (ignored).
# WHEELHOUSE_SKIP: what such a machine already has (the GPU stack: torch and its CUDA wheels, gigabytes);
# WHEEL_TARGET: pip download's target when it differs from here, e.g.
#   WHEEL_TARGET='--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64'
WHEELHOUSE      := wheelhouse
WHEELHOUSE_SKIP ?= ^(torch|torchvision|torchaudio|triton|nvidia-|cuda-)
WHEEL_TARGET    ?=
wheelhouse: $(STAMP)
	mkdir -p $(WHEELHOUSE)
	$(BIN)/python -m pip freeze --exclude-editable | grep -Eiv '$(WHEELHOUSE_SKIP)' > $(WHEELHOUSE)/requirements.txt
	$(BIN)/python -m pip download -q --no-deps -d $(WHEELHOUSE) $(WHEEL_TARGET) \
		-r $(WHEELHOUSE)/requirements.txt setuptools wheel
