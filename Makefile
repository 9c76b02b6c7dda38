# Two commands do everything on a fresh machine:
#   make run    install (if needed) and run the whole pipeline with `dvc repro`
#   make test   install (if needed), lint and type-check (seconds), then run the tests
# and, for the inner loop, `make test-fast`: lint, then the tests that need no server and train no model.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: setup setup-gpu run lint fmt test test-fast flow lock clean

setup: $(STAMP)

# The venv is (re)built from the lock whenever the lock or pyproject changes.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==0.13.9
	$(BIN)/uv pip sync --python $(PY) requirements.lock
	$(BIN)/uv pip install --python $(PY) --no-deps -e .
	touch $(STAMP)

# A GPU machine: the same lock, with tensorflow[and-cuda] of the locked TensorFlow version instead
# of tensorflow-cpu (the CUDA wheels it brings are not in the lock).
TF_VERSION = $(shell sed -n 's/^tensorflow-cpu==//p' requirements.lock)
setup-gpu:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==0.13.9
	grep -v '^tensorflow-cpu==' requirements.lock > $(VENV)/requirements-gpu.lock
	$(BIN)/uv pip sync --python $(PY) $(VENV)/requirements-gpu.lock
	$(BIN)/uv pip install --python $(PY) 'tensorflow[and-cuda]==$(TF_VERSION)'
	$(BIN)/uv pip install --python $(PY) --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/resnet-pipeline registry show $$($(PY) -c "import yaml; print(yaml.safe_load(open('params.yaml'))['register']['model_name'])")

# ruff (lint, then format check), mypy (configured in pyproject.toml) and the design's import rules
# (tests/architecture.py); seconds, before the long suite.
lint: $(STAMP)
	@if [ -d .git ] && git ls-files -s | grep -q '^120000'; then \
	  echo "git tracks symbolic links (a clone elsewhere would get them broken):"; \
	  git ls-files -s | awk '$$1 == "120000" {print "  " $$4}'; exit 1; fi
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(PY) -m tests.architecture

# The mechanical fixes: format the tree, apply ruff's safe autofixes, format what they touched.
fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# On TEST_WORKERS pytest-xdist workers, a test module to a worker (its module-scoped fixtures are built
# once); TEST_WORKERS=0 runs in this process. (Not --dist loadgroup: pytest-xdist 3.8 names a test's
# group by rewriting `item._nodeid`, which pytest 9 no longer reads, so groups are ignored.)
TEST_WORKERS ?= 2
test: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The fast tier (markers in pyproject.toml): no Prefect or S3 server, no training run, no subprocess of
# TensorFlow; minutes, for the inner loop. `make test` is the whole suite.
test-fast: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m pytest -q -m "not slow and not server" $(PYTEST_ARGS)

flow: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) flows/pipeline.py

# Re-resolve the lock from requirements.in (needs the package index; seconds with uv).
lock:
	$(BIN)/uv pip compile requirements.in -o requirements.lock --python-version 3.11

clean:
	rm -rf data artifacts registry .dvc-remote
