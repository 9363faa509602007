# The whole set-up on a fresh machine: `make demo` or `make test` create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export nnUNet_compile ?= f
export nnUNet_n_proc_DA ?= 1

.PHONY: install demo demo-quick test test-fast benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[test]"
	$(BIN)/nnunet-rl env --install-hook
	touch $@

demo: install
	$(BIN)/nnunet-rl demo

demo-quick: install
	$(BIN)/nnunet-rl demo --quick

test: install
	$(BIN)/python -m pytest -ra

test-fast: install
	$(BIN)/python -m pytest -ra -m "not e2e"

benchmark: install
	$(BIN)/python benchmarks/benchmark_trainers.py

clean:
	rm -rf $(VENV) nnunet_rl_data
