PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: venv test test-fast test-pod test-newer-jax test-mosaic-gpu lint demo bench gpu-compile-env clean

venv: $(STAMP)

# Re-installs only when the pins or the project metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
	  || $(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# CI: unit tests, end-to-end training runs, multi-process runs and the simulated 4-process pods.
# Whole files go to the workers (loadfile), so that module-scoped fixtures run once (the pods'
# shared runs above all), in collection order (conftest puts the pods, the longest file, first).
# (--dist loadgroup would be finer, but xdist 3.8 cannot group under pytest 9: it sets
# item._nodeid, which pytest 9 no longer reads, so xdist_group marks are ignored.)
test: venv
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# Only the simulated 4-process pods (tests/test_pod.py), e.g. after changing the launcher.
test-pod: venv
	$(BIN)/python -m pytest -q -n 1 -m pod tests

# The edit-test loop (about 3 minutes on 2 cores: 1189 tests in 171 s, 2026-12-06): skips the tests marked slow (over ~5 s each).
test-fast: venv
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" tests

# The suite under the jax of the lent GPU machines' image (jax 0.11.2, flax 0.12.10; the other
# pins as in requirements.txt), which needs Python 3.12 (NEWER_PYTHON=/path/to/python3.12 where
# none is found), in a second environment of about 3 GB. It found a crash that
# only jax 0.11 has (a segfault compiling sequence parallelism's gradient). CI runs only
# test-mosaic-gpu in it: the Mosaic GPU kernels in Mosaic GPU's interpret mode, which jax 0.10.2
# lacks (there those tests are skipped). Those tests need only jax, numpy and pytest, so
# test-mosaic-gpu installs just these (.installed-kernels) and test-newer-jax the rest on top.
NEWER_JAX_CORE := jax==0.11.2 jaxlib==0.11.2
NEWER_JAX := $(NEWER_JAX_CORE) flax==0.12.10
# The first Python 3.12 that runs: python3.12 on the PATH, else pyenv's (whose python3.12 shim
# fails unless 3.12 is selected).
ifeq ($(origin NEWER_PYTHON), undefined)
NEWER_PYTHON := $(shell for p in python3.12 $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python; \
  do $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && echo $$p && break; \
  done)
endif
NEWER_VENV := .venv-newer-jax
NEWER_PIP := $(NEWER_VENV)/bin/pip install -q --disable-pip-version-check
test-newer-jax: $(NEWER_VENV)/.installed
	$(NEWER_VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder tests
test-mosaic-gpu: $(NEWER_VENV)/.installed-kernels
	HGRN_REQUIRE_INTERPRET_MODE=1 $(NEWER_VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) \
	  tests/test_mosaic_gpu.py
$(NEWER_VENV)/.installed-kernels: requirements.txt pyproject.toml
	@test -n "$(NEWER_PYTHON)" || { echo "make: jax 0.11 needs Python 3.12, found none (python3.12" \
	  "on the PATH, or pyenv's): install it, or pass NEWER_PYTHON=/path/to/python3.12" >&2; exit 1; }
	test -x $(NEWER_VENV)/bin/python || $(NEWER_PYTHON) -m venv $(NEWER_VENV)
	$(NEWER_PIP) $(NEWER_JAX_CORE) $$(grep -E '^(numpy|pytest|pytest-xdist)==' requirements.txt)
	$(NEWER_PIP) --no-deps -e .
	touch $@
$(NEWER_VENV)/.installed: $(NEWER_VENV)/.installed-kernels
	grep -v -E '^(jax|jaxlib|flax)==' requirements.txt > $(NEWER_VENV)/requirements.txt
	$(NEWER_PIP) -r $(NEWER_VENV)/requirements.txt $(NEWER_JAX)
	touch $@

# ruff's lint rules and formatting check (configured in pyproject.toml; pinned in requirements.txt).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Tiny ListOps end to end on CPU: generate the data (once), train (resumes if interrupted), report.
# (tests/test_demo.py runs exactly this recipe, with DEMO_RUN and DEMO_CACHE in a temporary folder.)
DEMO_RUN ?= runs/demo-listops
DEMO_CACHE ?= cache
demo: venv
	$(BIN)/python -m hgrn_jax.data.listops --spec=tiny --cache_dir=$(DEMO_CACHE)
	$(BIN)/python -m experiments.train --config=experiments/configs/lra/listops.py:tiny --workdir=$(DEMO_RUN) --config.data.cache_dir=$(DEMO_CACHE)
	$(BIN)/python -m experiments.report $(DEMO_RUN)

# The GPU compiler without a GPU, for benchmarks/gpu_compile.py: an environment of its own with
# JAX's CUDA plugin (not a project dependency; about 1.3 GB), pinned to the project's jax.
GPU_COMPILE_VENV := .venv-gpu-compile
gpu-compile-env: $(GPU_COMPILE_VENV)/.installed
$(GPU_COMPILE_VENV)/.installed: requirements.txt
	test -x $(GPU_COMPILE_VENV)/bin/python || $(PYTHON) -m venv $(GPU_COMPILE_VENV)
	jax=$$(sed -n 's/^jax==//p' requirements.txt); \
	  $(GPU_COMPILE_VENV)/bin/pip install -q --disable-pip-version-check \
	  $$(grep -E '^(jax|jaxlib|flax|optax|numpy)==' requirements.txt) \
	  "jax-cuda12-plugin==$$jax" "jax-cuda12-pjrt==$$jax"
	touch $@

bench: venv
	$(BIN)/python benchmarks/scan.py

clean:
	rm -rf $(VENV) .pytest_cache
