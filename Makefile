PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: venv test demo bench clean

venv: $(STAMP)

# Re-installs only when the pins or the project metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
	  || $(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) tests

demo: venv
	$(BIN)/python -m hgrn_jax.demo

bench: venv
	$(BIN)/python benchmarks/scan.py

clean:
	rm -rf $(VENV) .pytest_cache
