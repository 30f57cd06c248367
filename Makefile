# Set-up and the two everyday commands. `make demo` and `make test` each set up
# ./.venv first (once), so either works on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo test test-all bench notebooks clean

setup: $(VENV)/.installed

# torch is pinned to the CPU wheel before anything else, so that no later
# requirement makes pip fetch a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/rnncap demo

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ''

bench: setup
	$(BIN)/rnncap bench

# JupyterLab on notebooks/ (the `notebooks` extra, part of `dev`)
notebooks: setup
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) runs .pytest_cache
