# Two commands a newcomer needs: `make run` and `make test`. Both bootstrap .venv from uv.lock.
# Only Python >= 3.11 and make are needed: uv itself is installed (pinned, with hashes) into .uv/.
PY ?= python3
UVDIR := .uv
UV := $(UVDIR)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5010
# uv uses the machine's Python and never downloads one; the project's venv is .venv
export UV_PYTHON := $(PY)
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
# `uv sync --frozen` installs exactly what uv.lock says (and fails if pyproject.toml no longer matches it);
# when nothing changed it returns in a few milliseconds, so no stamp file is needed.
SYNC := $(UV) sync --frozen --quiet

.PHONY: run test test-long test-latest lint lock dist bench bench-deps venv clean

$(UV): .ci/uv-requirements.txt
	$(PY) -m venv $(UVDIR)
	$(UVDIR)/bin/python -m pip install -q --require-hashes -r .ci/uv-requirements.txt
	touch $(UV)

# runtime dependencies only; --inexact keeps the test tools if a `make test` installed them before
run: $(UV)
	$(SYNC) --no-default-groups --inexact
	$(BIN)/lingua-scheduler serve --host $(HOST) --port $(PORT)

venv: $(UV)
	$(SYNC) --group test

test: venv
	$(BIN)/python -m pytest -q -m "not long"

test-long: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# Refresh uv.lock from pyproject.toml (newest versions it allows). Commit the result.
lock: $(UV)
	$(UV) lock --upgrade

# The newest versions pyproject.toml allows, in a separate venv, to see drift before it breaks a
# fresh clone. Not part of CI: its result depends on the day.
test-latest: $(UV)
	rm -rf .venv-latest
	$(UV) venv --quiet .venv-latest
	$(UV) pip install --quiet --python .venv-latest --upgrade -e . --group test
	.venv-latest/bin/python -m pytest -q -m "not long" -p no:cacheprovider

# sdist + wheel into dist/ (the wheel is built from the sdist). A stale src/*.egg-info is removed first:
# setuptools would otherwise take its file list into the sdist, and so into the wheel, even where the
# package data no longer names a file. tests/test_wheel.py builds, installs and runs the same way.
dist: $(UV)
	rm -rf dist build src/*.egg-info
	$(UV) build --quiet --out-dir dist

# Extra packages of the benchmarks only (not of the product): Celery for bench/peer_celery.py,
# matplotlib for the plots of bench/scaling.py; locked like everything else.
bench-deps: $(UV)
	$(SYNC) --group test --group bench

clean:
	rm -rf $(VENV) $(UVDIR) .venv-latest build dist *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
