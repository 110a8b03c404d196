# `make demo` and `make test` each create .venv if missing, install, then run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install system-deps demo lint test test-fast bench schemas clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch==2.14.1 and torchvision==0.29.1 install from the local wheel cache; the lock pins the rest
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/clipline demo

# The browser and promtool that the UI and dashboard tests drive, and the PostgreSQL behind the shared
# tracking server's tests (Debian's packages; root installs them). PostgreSQL's binaries are found by version
# glob: Debian keeps them in /usr/lib/postgresql/<major>/bin, off PATH.
system-deps:
	@command -v chromium >/dev/null && command -v promtool >/dev/null \
	  && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium prometheus postgresql >/dev/null; \
	  else echo "make: the UI, dashboard and tracking-server tests need: sudo apt-get install chromium prometheus postgresql"; fi; }

# ruff and mypy read their settings from pyproject.toml; mypy checks the package, ruff the tests and configs too
lint: install
	$(BIN)/ruff check pipelines tests cluster dashboards
	$(BIN)/mypy pipelines

# Two pytest-xdist processes by default, one test file each at a time (tests/conftest.py hands the files out,
# longest first, the cluster files together); PYTEST_WORKERS=0 runs the suite in this process. On the 2-core
# machine one process leaves the CPUs a third idle (29.0 min on 2026-12-07); two ran 830 tests in 17.8 and 19.3 min
# once the files really were handed out whole (before, xdist split them test by test: see conftest.py), and 946
# tests in 19.0-20.4 min later that night.
PYTEST_WORKERS ?= 2

test: install system-deps
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m tests.benchmarks.crawl_vs_img2dataset
	$(BIN)/python -m tests.benchmarks.crawl_photos
	$(BIN)/python -m tests.benchmarks.crawl_soak
	$(BIN)/python -m tests.benchmarks.availability
	$(BIN)/python -m tests.benchmarks.host_tokens
	$(BIN)/python -m tests.benchmarks.near_dedup
	$(BIN)/python -m tests.benchmarks.storage_s3_vs_local
	$(BIN)/python -m tests.benchmarks.resize_vs_img2dataset
	$(BIN)/python -m tests.benchmarks.clip_score
	$(BIN)/python -m tests.benchmarks.embed
	$(BIN)/python -m tests.benchmarks.train_vs_open_clip
	$(BIN)/python -m tests.benchmarks.train_eval_async
	$(BIN)/python -m tests.benchmarks.demo_models
	$(BIN)/python -m tests.benchmarks.log_model
	$(BIN)/python -m tests.benchmarks.mlflow_store
	$(BIN)/python -m tests.benchmarks.train_startup
	# prints "no GPU: skipped, run with --smoke for the CPU check" and exits 0 on a machine without a GPU
	$(BIN)/python -m tests.benchmarks.gpu

schemas: install
	$(BIN)/clipline schemas

clean:
	rm -rf $(VENV) clipline-data .pytest_cache
