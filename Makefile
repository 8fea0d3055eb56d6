# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv from this repo alone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean torch gpu-bundle

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stylequeue demo

# Three test processes, a file each at a time: most tests wait on real servers and worker processes, so on
# two cores three of them take about half the wall time of one (tests/conftest.py: every process starts its
# own Redis, S3 server and, where needed, RabbitMQ).
test: $(STAMP) lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider -n 3 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check stylequeue tests bench

# The whole package at mypy's defaults, and strict where the job store, the broker, the worker and the
# pipeline are (the modules they import are read for their types, their own findings not reported there).
typecheck: $(STAMP)
	$(VENV)/bin/mypy stylequeue
	$(VENV)/bin/mypy --strict --follow-imports=silent stylequeue/jobs stylequeue/broker.py \
		stylequeue/broker_transport.py stylequeue/worker stylequeue/pipeline

bench: $(STAMP)
	$(PY) bench/models.py
	$(PY) bench/submit.py
	$(PY) bench/codec.py
	$(PY) bench/storage.py
	$(PY) bench/e2e.py
	$(PY) bench/queue_cpu.py
	$(PY) bench/redis_ops.py
	$(PY) bench/store_steps.py

# PyTorch for the `torch` runtime and its tests, only where its CPU wheel lies on this disk: the lookup is
# --no-index (find-links only), so no multi-GB CUDA build is ever fetched; elsewhere torch is left to the
# user (`pip install 'stylequeue[torch]'`) and its tests skip.
TORCH_VERSION := 2.13.0
torch: $(STAMP)
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch: already installed"; exit 0; fi; \
	dir=$$(mktemp -d); \
	if $(PY) -m pip download -q --no-index --no-deps --only-binary=:all: -d $$dir torch==$(TORCH_VERSION) \
	     2>/dev/null && ls $$dir | grep -q '+cpu'; then \
	  $(PY) -m pip install -q $$dir/torch-*.whl && echo "torch: installed $$(ls $$dir)"; \
	else echo "torch: no local CPU wheel of torch $(TORCH_VERSION); not installed (torch tests will skip)"; fi; \
	rm -rf $$dir

# What bench/gpu.py needs on the lent GPU machine beyond its image, as wheels in .gpubundle/ (see the script).
gpu-bundle: $(STAMP)
	$(PY) scripts/gpu_bundle.py

clean:
	rm -rf $(VENV) stylequeue-demo stylequeue-data
