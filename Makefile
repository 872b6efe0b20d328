# Two commands do all set-up: `make demo` runs the 4-arm study on the embedded corpus, `make test` the suite.
# `make demo` installs only what the demo needs (requirements.txt); `make test` adds the test runner and
# every optional integration the suite exercises (requirements-dev.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed
DEV := $(VENV)/.installed-dev

.PHONY: demo test clean

$(CORE): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(CORE)

$(DEV): $(CORE) requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(DEV)

demo: $(CORE)
	$(BIN)/rankprobe demo --out rankprobe-demo

# Two pytest-xdist workers, as many as CI's cores: most tests are bound by Python and by the start-up
# of the processes they launch, not by torch's threads (conftest.py gives each worker its share).
TEST_WORKERS ?= 2

test: $(DEV)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

clean:
	rm -rf $(VENV) rankprobe-demo
