# The two commands a newcomer runs: `make demo` and `make test`.
# Both build .venv from nothing but this clone and the package index.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test tests lint typecheck unit demo stack bench clean

venv: $(STAMP)

# fedimg-messages/ (the message schema package) is a distribution of its own
# that fedimg requires: installed from this clone in the same pip run.
# uv resolves the same releases as pip in a tenth of the time (a fresh clone's
# `make test` has 6 minutes on a 2-core machine); where uv cannot be had or
# fails, pip does the same install.
PIP := $(BIN)/pip --quiet --disable-pip-version-check
PACKAGES := -e ./fedimg-messages -e '.[hub,test]'
$(STAMP): setup.py pyproject.toml fedimg-messages/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	( $(PIP) install uv && $(BIN)/uv pip install --quiet --python $(BIN)/python $(PACKAGES) ) \
	  || ( $(PIP) install --upgrade pip && $(PIP) install $(PACKAGES) )
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# One worker per core: the suite is CPU-bound (docs/performance.md), and with
# four workers on two cores the hubs of integration tests were starved past
# their deadlines. Tests that share a stack or the RabbitMQ node stay in one
# worker (tests/conftest.py groups them for --dist loadgroup).
# mypy (one core for half a minute) runs beside them; either failing fails `make test`.
TEST_WORKERS ?= 2
PYTEST = $(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup
test: lint
	$(MAKE) --no-print-directory -j2 typecheck tests

tests: $(STAMP)
	$(PYTEST)

unit: $(STAMP)
	$(PYTEST) -m "not integration"

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
