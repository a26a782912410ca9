# Two commands set everything up on a fresh machine with Python 3.11 and make:
#   make demo   creates .venv if missing, installs, trains and exports the demo
#   make test   creates .venv if missing, installs, runs the whole suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export KERAS_BACKEND := tensorflow
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Reinstall whenever the metadata, the version or the pinned versions change.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml constraints.txt kerasbn/_version.py
	$(BIN)/python -m pip install -c constraints.txt -e ".[test,demo,tutorials]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python -m kerasbn.demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info

# The wheel and sdist as users get them: built, their file lists checked, and the
# wheel installed in a bare venv (runtime dependencies only) where the README
# quickstart runs outside the source tree.
.PHONY: wheel-check
wheel-check: $(STAMP)
	rm -rf dist kerasbn.egg-info  # a stale egg-info's file list would leak into the sdist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python tools/check_dist.py dist
	$(BIN)/python tools/quickstart_from_wheel.py dist
