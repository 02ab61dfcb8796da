# Every target bootstraps .venv on first use (idempotent): torch's CPU build first, then the package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,all]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m d2engine.tools.train_net --config-file configs/digits/convnet.yaml OUTPUT_DIR output/demo

# The checks first: any lint, format or type error fails `make test` before pytest runs.
test: lint
	$(PY) -m pytest -q

docs: $(STAMP)  # the site, warnings as errors (no MkDocs-2 banner): open site/index.html
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy d2engine

bench: $(STAMP)
	$(PY) bench/overhead.py
	$(PY) bench/checkpoint.py
	$(PY) bench/ddp.py

clean:
	rm -rf $(VENV) output build dist site *.egg-info
