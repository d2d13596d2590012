# Set-up commands for a fresh machine. Each target creates or reuses the project virtual
# environment in .venv and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed
# Path to a Taobao UserBehavior CSV; empty means generated events.
EVENTS ?=
# Arguments for `python -m training.train`: a short, fast schedule that suits the demo data.
TRAIN_ARGS ?= --epochs 15 --learning-rate 0.01

.PHONY: demo test stop install

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

demo: install
	TRAIN_ARGS="$(TRAIN_ARGS)" bash platform/local/demo.sh $(EVENTS)

stop:
	bash platform/local/stop.sh

# pytest exits with 5 when it collects no tests; that is not a failure of the suite.
test: install
	$(VENV)/bin/python -m pytest -q tests; status=$$?; if [ $$status -eq 5 ]; then exit 0; fi; exit $$status
