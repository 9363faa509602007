# The whole set-up on a fresh machine: `make demo` or `make test` create .venv and install everything.
# The tests run on the CPU: no torch.compile, one augmentation worker, two processes for nnU-Net's exports.
CPU_ENV := nnUNet_compile=f nnUNet_n_proc_DA=1 nnUNet_def_n_proc=2
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BENCHMARK_ARGS ?= -d 4 -c 3d_fullres --prepare-msd ../shared/data/Task04_Hippocampus
# Two test files at a time (pytest-xdist), each file in one worker so its module fixtures are built once: the suite's
# nnU-Net processes spend much of their time starting up and waiting, which the other worker fills.
PYTEST_PARALLEL ?= -n 2 --dist loadfile

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
	$(BIN)/ruff check .  # rules in pyproject.toml
	$(CPU_ENV) $(BIN)/python -m pytest $(PYTEST_PARALLEL) -ra --durations=25  # the slowest, to keep it within 30 min

test-fast: install
	$(CPU_ENV) $(BIN)/python -m pytest $(PYTEST_PARALLEL) -ra -m "not e2e"

benchmark: install  # needs nnU-Net's folder variables; converts and plans MSD Hippocampus there when missing
	$(BIN)/python benchmarks/benchmark_trainers.py $(BENCHMARK_ARGS)

clean:
	rm -rf $(VENV) nnunet_rl_data
