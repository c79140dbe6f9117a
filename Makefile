# Two commands for a newcomer: `make demo` and `make test`. Both build .venv from pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: constraints demo test lint typecheck pytest test-smoke test-slow test-systemd bench soak systemd-tools clean

# constraints.txt pins every package (and pip) to the versions CI last passed with: a clean clone
# builds the same venv next month. pyproject.toml keeps the ranges a user's install accepts.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ingestd demo

test: $(STAMP) systemd-tools lint typecheck pytest

# lint-imports checks the import contracts in pyproject.toml ([tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check ingestd tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy --strict ingestd

# Four workers on two cores, one test file each at a time: most tests wait on real processes and
# timers (the suite uses ~1.1 cores; 6.5 min against 8.5-9 with three workers, 2026-12-06).
# -rs names every skipped test and why (only the real-mongod ones may skip under CI).
pytest: $(STAMP)
	$(BIN)/pytest -q -rs -m "not slow and not systemd and not smoke" -p no:cacheprovider -n 4 \
	  --dist loadfile

# The soak proofs and bench scripts at their smallest size, the 60 s MongoDB outage and the 20-kill
# test (~3 min; CI runs it after make test, which they would push near its 10 minutes).
test-smoke: $(STAMP)
	$(BIN)/pytest -q -rs -m smoke -p no:cacheprovider -n 3 --dist load

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow -p no:cacheprovider --timeout 3600

# The shipped unit under a real systemd: Debian 12 and 13 containers (debootstrap, cached in
# /var/cache/ingestd-test; systemd-nspawn). Needs root; skips with a note otherwise (fails if CI=true).
test-systemd: $(STAMP)
	$(BIN)/pytest -q -m systemd -p no:cacheprovider --tb=short --timeout 1200 tests/systemd

# The benchmark adds its own contenders' libraries (tweepy) to the venv: the bench extra.
$(VENV)/.bench-stamp: pyproject.toml constraints.txt $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-stamp
	$(BIN)/python bench/run.py

# The long proofs of docs/reliability.md (~2 h in all; never part of `make test`). Pick some with
# SOAK="outage kills" (or outage,kills); scale them with SOAK_* variables (bench/soak/*.py).
comma := ,
SOAK ?= outage kills corrupt reloads hour
soak: $(STAMP)
	$(BIN)/python -m bench.soak $(subst $(comma), ,$(SOAK))

# systemd-analyze verifies the shipped unit (Debian's systemd package; .ci/run installs it).
# Nothing is installed here: without it the unit test is skipped, and says so.
systemd-tools:
	@command -v systemd-analyze >/dev/null 2>&1 || \
	  echo "note: systemd-analyze not found (apt-get install -y systemd); tests/test_systemd_unit.py will be skipped"

# New versions, on purpose: the newest releases pyproject.toml allows, frozen into constraints.txt
# (then run make test and commit both). Uses a scratch venv; .venv is left as it is.
constraints:
	rm -rf .venv-constraints
	$(PY) -m venv .venv-constraints
	.venv-constraints/bin/pip install -q --upgrade pip
	.venv-constraints/bin/pip install -q -e '.[dev,bench]'
	{ sed -n '/^#/p' constraints.txt; .venv-constraints/bin/pip freeze --exclude-editable; \
	  .venv-constraints/bin/pip --version | awk '{print "pip==" $$2}'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-constraints

clean:
	rm -rf $(VENV) demo-state .mypy_cache .ruff_cache .pytest_cache
