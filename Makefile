# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv from this repo alone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stylequeue demo

test: $(STAMP)
	$(VENV)/bin/ruff check stylequeue tests bench
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) bench/models.py
	$(PY) bench/submit.py
	$(PY) bench/codec.py
	$(PY) bench/storage.py
	$(PY) bench/e2e.py
	$(PY) bench/queue_cpu.py

clean:
	rm -rf $(VENV) stylequeue-demo stylequeue-data
