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

DATA := data
CORPUS := $(DATA)/sample_corpus/train.jsonl
TOKENIZER := $(DATA)/tokenizer/tokenizer.model
TRAIN_IDX := $(DATA)/sample_train_text_document.idx
VALID_IDX := $(DATA)/sample_valid_text_document.idx
RUN := runs/doge_tiny_cpu
HF := hf/doge_tiny_cpu

.PHONY: install test demo FORCE

install: $(STAMP)

# The stamp holds the install settings: another TORCH or VENV_FLAGS than the venv was made with makes it
# again from scratch (--clear: a CPU torch already in it would shadow the system's CUDA one).
INSTALL_SETTINGS := torch=$(TORCH) venv_flags=$(VENV_FLAGS)
ifneq ($(strip $(file < $(STAMP))),$(strip $(INSTALL_SETTINGS)))
$(STAMP): FORCE
CLEAR := $(if $(wildcard $(VENV)),--clear)
endif

$(STAMP): setup.py
	$(PYTHON) -m venv $(CLEAR) $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(strip $(TORCH)),$(PY) -m pip install --quiet "$(TORCH)")
	$(PY) -m pip install --quiet -e ".[dev]"
	echo "$(INSTALL_SETTINGS)" > $(STAMP)

test: install
	$(PY) -m pytest

# The demo reuses what is built: corpus, tokenizer and .bin/.idx are file targets, and pretraining
# resumes from (or stops at) the run's latest checkpoint. Each target is the file its tool writes last
# (train.jsonl, tokenizer.model, the .idx), so an interrupted build is redone, not taken as complete.
# Two ranks (CPU, or two GPUs); one on a machine with one GPU, where the deepspeed launcher would start
# the second rank on a GPU that is not there.
DEMO_RANKS = $(shell $(PY) -c "import torch; print(1 if torch.cuda.device_count() == 1 else 2)")

demo: install $(TRAIN_IDX) $(VALID_IDX)
	$(VENV)/bin/deepspeed --num_gpus $(DEMO_RANKS) launch/pretrain.py --config configs/doge_tiny_cpu.yaml --ds_config configs/zero2.json
	$(PY) launch/export_hf.py --checkpoint $(RUN) --output $(HF)
	$(PY) launch/generate.py --model $(HF) --prompt "The list" --max_new_tokens 60
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir runs/"

$(CORPUS): | install
	$(PY) data_tools/build_sample_corpus.py --output-dir $(DATA)/sample_corpus

$(TOKENIZER): $(CORPUS)
	$(PY) data_tools/train_tokenizer.py --input $(CORPUS) --output-dir $(DATA)/tokenizer --vocab-size 8192

$(DATA)/sample_%_text_document.idx: $(TOKENIZER)
	$(PY) data_tools/preprocess_data.py --input $(DATA)/sample_corpus/$*.jsonl --output-prefix $(DATA)/sample_$* \
		--tokenizer-type SentencePieceTokenizer --tokenizer-model $(TOKENIZER) --append-eod --workers 2
