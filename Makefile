# The commands the README shows. Each creates .venv on first use (python3 >= 3.11).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

demo: $(PY)
	$(PY) -m pip install -q -e .
	$(VENV)/bin/fusillade-celery demo

test: $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	@bash .ci/chromium
	$(PY) -m pytest

lint: $(PY)
	$(VENV)/bin/ruff check fusillade_celery tests benchmarks
	$(VENV)/bin/ruff format --check fusillade_celery tests benchmarks
	$(VENV)/bin/mypy

bench: $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m benchmarks.run
