# Everything runs in .venv, which the first target creates.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CORE_SRC := $(wildcard realtime/_core/*.pyx realtime/_core/*.pxd realtime/_core/*.pxi)

.PHONY: all build run test bench clean services

all: build

$(VENV)/.deps: requirements.txt requirements-dev.txt pyproject.toml
	@# on Debian/Ubuntu `venv` imports without python3-venv; ensurepip is what is missing
	@$(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq python3-venv python3-dev build-essential)
	@# the compiled core needs a C and a C++ compiler (_ingest uses C++'s maps)
	@command -v gcc >/dev/null && command -v g++ >/dev/null || (apt-get update -qq && apt-get install -y -qq build-essential python3-dev)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# --no-compile: what is imported is compiled when it first is (~15 s less here)
	$(PIP) install -q --no-compile -r requirements-dev.txt
	@# the distribution was called `realtime` before it became realtime-fleet
	@$(PIP) uninstall -y -q realtime >/dev/null 2>&1 || true
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

# The extension is rebuilt in place whenever a Cython source changes.
$(VENV)/.core: $(VENV)/.deps $(CORE_SRC) setup.py
	$(PY) setup.py -q build_ext --inplace
	@touch $@

build: $(VENV)/.core

run: build
	$(VENV)/bin/realtime serve

services:
	@scripts/services.sh

test: build services
	@# three processes on two cores: the tests mostly wait on servers (tests/conftest.py)
	$(PY) -m pytest -q -n 3 --durations=20 tests
	./bench.sh --smoke

bench: build
	./bench.sh

clean:
	rm -rf build $(VENV) realtime/_core/*.so realtime/_core/*.c realtime/_core/*.cpp *.egg-info
