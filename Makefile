# The two commands of the README: `make demo` and `make test`. Both install first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test
install:
	bash scripts/install.sh $(VENV)

demo: install
	$(PY) train.py --help

test: install
	$(PY) -m pytest tests -q -ra
