# `make demo` runs the main job on a fresh machine, `make test` runs the tests; both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test demo lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check src tests

test: install lint
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/allconv search --model A --branch model --dataset fake --subset 500 --val-size 200 \
		--preprocess standardize --epochs 2 --bn --trials 6
	$(VENV)/bin/allconv report
