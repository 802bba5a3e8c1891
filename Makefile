# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FEDEM := $(VENV)/bin/fedem
STAMP := $(VENV)/.installed-stamp
DEMO := runs/demo

.PHONY: install demo test lint bench clean

# torch first: on a CPU-only machine `torch==2.13.0` is the CPU wheel on local disk, while an
# unpinned torch would pull a multi-GB CUDA build. With a GPU, the default (CUDA) build is wanted.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(VENV)/bin/pytest -q -m "not gpu"

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

# The whole model pipeline on the shipped data, in minutes on 2 CPU cores:
# tokenizer → pretrain seshu-small → LoRA en→hi → merge → evaluate → generate.
demo: install
	$(FEDEM) tokenizer train --data data/mono --vocab-size 16000 --out $(DEMO)/tok
	$(FEDEM) pretrain --config configs/seshu-small.yaml tokenizer=$(DEMO)/tok out=$(DEMO)/seshu-small \
		train.max_steps=150 train.eval_every=50 train.save_every=50
	$(FEDEM) finetune --config configs/finetune-translate.yaml base=$(DEMO)/seshu-small \
		out=$(DEMO)/adapters/en-hi train.max_steps=60 train.eval_every=30 train.save_every=30
	$(FEDEM) merge --base $(DEMO)/seshu-small --adapters $(DEMO)/adapters/en-hi --method linear \
		--weights 1.0 --out $(DEMO)/seshu-small-en-hi
	$(FEDEM) evaluate --model $(DEMO)/seshu-small-en-hi --languages en,hi,ta,or --max-lines 64 \
		--max-pairs 8 --out $(DEMO)/eval
	$(FEDEM) generate --model $(DEMO)/seshu-small-en-hi --prompt $$'English: How are you?\nHindi:' \
		--max-new-tokens 24 --repetition-penalty 1.3
	@echo; echo "demo outputs in $(DEMO)/ — evaluation table: $(DEMO)/eval/report.md"

bench: install
	$(PY) bench/train_throughput.py --out bench/results

clean:
	rm -rf runs $(VENV)
