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

test: $(STAMP)
	$(PY) -m pytest -q tests

demo:
	@echo "make demo is not available yet: it arrives with the demo issue (tiny models trained on a local corpus)."
	@exit 2

clean:
	rm -rf $(VENV) .pytest_cache
