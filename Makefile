# modscan: `make demo` runs the embedded default end to end; `make test` runs the test suite.
# Both create .venv and install what they need on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.modscan-installed
export RAY_AUTH_MODE ?= disabled

.PHONY: demo test test-slow test-all lint install evaluate bench bench-scale docs-transcripts clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/modscan demo

# ruff, mypy, then every test but those marked slow (about 8 minutes on 2 cores)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

# The tests marked slow: killed drivers, a lost node, a killed shard server, S3 outages, and the
# multi-day and multi-hour variants of paths make test covers once (CI runs them after make test)
test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow

test-all: test test-slow

# ruff, then mypy on models/, pipeline/ and jobs/ ([tool.mypy] in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Development evaluation on COCO (needs ../shared/data); writes eval-out/report.md
evaluate: $(STAMP)
	$(VENV)/bin/modscan evaluate --photos ../shared/data/coco256 --seed 0 --out eval-out

# Benchmarks; real photos from ../shared/data when present (else scikit-image's samples): the synthetic vectors
# of search/memory resample up to 2,000 of them (bench scale checks their tails against real pictures')
BENCH_PHOTOS ?= $(wildcard ../shared/data/photos/imagenet-sample ../shared/data/photos/bsds500 ../shared/data/coco256 ../shared/data/kodak24)
BENCH_ARGS := $(foreach d,$(BENCH_PHOTOS),--photos $(d))
bench: $(STAMP)
	$(VENV)/bin/modscan bench search --gallery-size 1000000 $(BENCH_ARGS)
	$(VENV)/bin/modscan bench memory --gallery-size 1000000 $(BENCH_ARGS)
	$(VENV)/bin/modscan bench decode $(BENCH_ARGS)
	$(VENV)/bin/modscan bench pipeline --images 2000 $(BENCH_ARGS)

# Precision at 10K-10M references from real pictures (needs ../shared/data); stores the tails in the model card
SHARED := ../shared/data
bench-scale: $(STAMP)
	$(VENV)/bin/modscan bench scale --trained $(SHARED)/photos/imagenet-sample --trained $(SHARED)/photos/bsds500 \
		--unseen $(SHARED)/coco256 --unseen $(SHARED)/kodak24 --generated 300 --write-card

# Operator transcripts of docs/operations.md, rerun for real with the shipped model (starts local Ray)
docs-transcripts: $(STAMP)
	$(PY) docs/make_transcripts.py

clean:
	rm -rf demo-out bench-out eval-out .pytest_cache .mypy_cache
