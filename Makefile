# The two commands a newcomer runs: `make demo` and `make test`.
# Both build .venv from nothing but this clone and the package index.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint typecheck unit demo stack bench clean

venv: $(STAMP)

# fedimg-messages/ (the message schema package) is a distribution of its own
# that fedimg requires: installed from this clone in the same pip run.
$(STAMP): setup.py pyproject.toml fedimg-messages/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e ./fedimg-messages -e '.[hub,test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest -m "not integration"

# BUS=amqp: over a private RabbitMQ node, two fedora-messaging consumer processes per app.
BUS ?= fedmsg

demo: $(STAMP)
	$(BIN)/python -m devel.demo --bus $(BUS)

stack: $(STAMP)
	$(BIN)/python -m devel.stack up --bus $(BUS)

bench: $(STAMP)
	$(BIN)/python benchmarks/upload.py
	$(BIN)/python benchmarks/promote.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
