# Two commands for a new user: `make demo` (set up + run the quickstart pipeline) and `make test`.
PY := .venv/bin/python
EXPERIMENT ?= quickstart

.PHONY: setup test demo lint corpus

setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check .

corpus: setup
	$(PY) scripts/build_corpus.py corpus=$(EXPERIMENT)

demo: setup
	bash scripts/demo.sh $(EXPERIMENT)
