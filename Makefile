# Two entry points a newcomer needs; .ci/run calls `make test` exactly as README says.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip

.PHONY: install test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python
	$(PIP) install -e '.[test,hf]'

test: install
	$(VENV)/bin/python -m pytest
