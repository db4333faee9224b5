# make serve: create .venv, install, start the gateway on :4000 with routes.yaml
# make test:  create .venv, install with test extras, run the whole suite
# make bench: create .venv, install, benchmark (contrib/bench/run.py; BENCH_ARGS=--quick for a
#             smoke run, BENCH_COMPARE=litellm to also measure the LiteLLM proxy)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 4000
CONFIG ?= routes.yaml
PYTEST_ARGS ?=
BENCH_ARGS ?=
BENCH_COMPARE ?=

.PHONY: install serve test check bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/proxyctl serve --config $(CONFIG) --port $(PORT)

check: $(STAMP)
	$(BIN)/proxyctl check --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python contrib/bench/run.py $(if $(BENCH_COMPARE),--compare $(BENCH_COMPARE)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
