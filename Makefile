# The two commands a newcomer runs: `make demo` and `make test`.
# Both build .venv from nothing but this clone and the package index.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test tests integration lint typecheck typecheck-niced unit unit-niced demo stack bench clean

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

# Bytecode is cached. Where PYTHONDONTWRITEBYTECODE is set (this machine sets it),
# every Python process the tests start (hubs, moto_server, relays, consumers,
# CLIs, pytest's workers) would compile every module it imports, every time:
# a fresh venv holds no .pyc at all. Measured: moto_server's imports 3.6 CPU-s
# instead of 2.1, pytest's collection 13 instead of 5.5 (docs/performance.md).
unexport PYTHONDONTWRITEBYTECODE

# One worker per core for each run. Tests that share a stack or the RabbitMQ
# node stay in one worker (tests/conftest.py groups them for --dist loadgroup).
TEST_WORKERS ?= 2
PYTEST = $(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup

# `make test`: the integration tests (real hubs, relays, moto_server, RabbitMQ,
# with deadlines) at normal priority; the unit tests and mypy beside them at a
# lower one (nice), using the CPU the integration tests leave while they wait.
# All at one priority, four workers on two cores starved the hubs past their
# deadlines; serialised, the CPU idles while hubs wait. Each target's output is
# printed whole when it ends; any failing fails `make test`.
test: lint
	$(MAKE) --no-print-directory -j3 --output-sync=target typecheck-niced integration unit-niced

# Every test in one run (what `make test` runs, in two).
tests: $(STAMP)
	$(PYTEST)

# Integration tests spend much of their time waiting on the processes they
# started: three workers keep the two cores busy (the niced unit tests take what is left).
INTEGRATION_WORKERS ?= 3
integration: $(STAMP)
	$(BIN)/pytest -n $(INTEGRATION_WORKERS) --dist loadgroup -m integration

unit: $(STAMP)
	$(PYTEST) -m "not integration"

unit-niced: $(STAMP)
	nice -n 10 $(PYTEST) -m "not integration"

typecheck-niced: $(STAMP)
	nice -n 10 $(BIN)/mypy

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
