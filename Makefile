# Two commands for a newcomer: `make demo` and `make test`. Both build .venv from pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck pytest test-slow bench systemd-tools clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ingestd demo

test: $(STAMP) systemd-tools lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check ingestd tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict ingestd

# Three workers, one test file each at a time: most tests wait on real processes and timers.
pytest: $(STAMP)
	$(BIN)/pytest -q -m "not slow" -p no:cacheprovider -n 3 --dist loadfile

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow -p no:cacheprovider --timeout 1800

bench: $(STAMP)
	$(BIN)/python bench/run.py

# systemd-analyze verifies the shipped unit; Debian's systemd package provides it.
systemd-tools:
	@command -v systemd-analyze >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; } || \
	  echo "note: systemd-analyze unavailable (not root?); the unit test will be skipped"

clean:
	rm -rf $(VENV) demo-state .mypy_cache .ruff_cache .pytest_cache
