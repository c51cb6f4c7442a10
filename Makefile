# The README's commands. Each creates or updates the project's virtualenv .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: test venv clean demo

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test,eval]"
	touch $(STAMP)

venv: $(STAMP)

# The suite in TEST_WORKERS processes (pytest-xdist; a test module stays in one process, so its fixtures are built
# once; the slowest modules first: tests/conftest.py SLOW_FIRST). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# Tiny models trained on a locally synthesised eSpeak corpus, evaluated, written up in demo/report.md (resumes
# when re-run; DEMO_ARGS=--quick for the smoke-test size, DEMO_ARGS=--fresh to start over). DEMO_START: when make
# started, so that the report's total includes the virtualenv step.
DEMO_ARGS ?=
DEMO_START := $(shell date +%s)
demo: $(STAMP)
	$(PY) -m unitok_jax.demo --out demo --setup-seconds $$(( $$(date +%s) - $(DEMO_START) )) $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
