# Two entry points a newcomer needs; .ci/run calls `make test` exactly as README says.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip

.PHONY: install test run

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python
	$(PIP) install -e '.[test,hf]'

test: install
	$(VENV)/bin/python -m pytest

# The main job: the six T5-L settings at the default profile, as the Prefect flow
# staged-growth on Prefect's temporary local server (no other setup).
run: install
	$(VENV)/bin/deepfusion flow stages.yaml
