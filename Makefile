# Two commands set everything up on a fresh machine with Python 3.11 and make:
#   make demo   creates .venv if missing, installs, trains and exports the demo
#   make test   creates .venv if missing, installs, runs the whole suite
# Also:
#   make test-platform   the platform-sensitive modules only (PLATFORM_TESTS below)
#   make test-min        the whole suite on the oldest declared versions (.venv-min)
#   make bench           the benchmarks (benchmarks/results.md)
# Another Python: make test PYTHON=python3.13 VENV=.venv-3.13
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The oldest Python and the oldest versions setup.cfg declares (constraints-min.txt).
MIN_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python) python3.10)
MIN_VENV := .venv-min
MIN_STAMP := $(MIN_VENV)/.installed

export KERAS_BACKEND := tensorflow
export TF_CPP_MIN_LOG_LEVEL := 2

# The modules whose results depend on which CPU kernels TensorFlow runs. oneDNN
# (TF_ENABLE_ONEDNN_OPTS=1; on by default on x86 CPUs with AVX512-VNNI/BF16,
# AVX-VNNI or AMX) replaces TensorFlow's convolution, matmul and batch-norm
# kernels, lets Conv2D take channels-first inputs, switches the CPU allocator to
# BFC, and makes our BatchNorm train with TensorFlow's fused op (float32 NHWC).
# Hence: layer numerics against Keras' layers, the exported, folded and golden
# SavedModels (conv graphs, TFLite), recalibration and channels-first models
# (conv models run as plain ops or through XLA), BatchNorm training steps inline
# and as the fused op, XLA compile counts, the benchmark smoke run (peak memory
# per allocator) and the demo (conv model, trained and served).
# .ci/run runs the whole suite with oneDNN off and these again with it on.
# Add a module here when its results can differ with the CPU's kernels.
PLATFORM_TESTS := \
	tests/test_batch_norm_numerics.py \
	tests/test_batch_renorm.py \
	tests/test_group_norm.py \
	tests/test_compilation.py \
	tests/test_export.py \
	tests/test_fusion.py \
	tests/test_fused_inference.py \
	tests/test_fused_training.py \
	tests/test_golden_savedmodels.py \
	tests/test_recalibrate.py \
	tests/test_small_inputs.py \
	tests/test_channels_first.py \
	tests/test_benchmarks_smoke.py \
	tests/test_demo.py

.PHONY: install test test-platform test-min demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Reinstall whenever the metadata, the version or the pinned versions change.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml constraints.txt kerasbn/_version.py
	$(BIN)/python -m pip install -c constraints.txt -e ".[test,demo,tutorials,hub,onnx]"
	touch $(STAMP)

install: $(STAMP)

# Test modules run in parallel worker processes (pytest-xdist), one module per
# worker at a time so module-scoped fixtures are built once: the suite is
# dominated by single-threaded tracing, so 2 workers use a 2-core machine.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST)

test-platform: $(STAMP)
	$(PYTEST) $(PLATFORM_TESTS)

$(MIN_VENV)/bin/python:
	@$(MIN_PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null || \
		{ echo "no Python 3.10 at '$(MIN_PYTHON)': pass MIN_PYTHON=/path/to/python3.10" >&2; exit 1; }
	$(MIN_PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --upgrade pip

$(MIN_STAMP): $(MIN_VENV)/bin/python setup.cfg pyproject.toml constraints-min.txt
	$(MIN_VENV)/bin/python -m pip install -c constraints-min.txt -e ".[test,demo,tutorials]"
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile

demo: $(STAMP)
	$(BIN)/python -m kerasbn.demo

# Layers alone (results.md), whole models with TensorFlow's default CPU
# settings (results_models.md), and plain steps with oneDNN off (the default on
# CPUs without AVX512-VNNI/BF16), with TensorFlow's default CPU allocator
# (results_models_onednn_off.md) and with its BFC allocator, which oneDNN
# uses anyway (results_models_bfc.md), each model's normalization inputs timed
# one by one with oneDNN as TensorFlow sets it and off (results_model_layers*.md),
# first calls at new shapes (results_first_calls.md); each writes its table
# under benchmarks/. The whole-model table is also drawn as a chart, speed
# relative to Keras BN with its intervals (results_models.svg, matplotlib).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.models
	$(BIN)/python -m benchmarks.chart
	TF_ENABLE_ONEDNN_OPTS=0 TF_CPU_ALLOCATOR_USE_BFC=true $(BIN)/python -m benchmarks.models \
		--steps plain --output benchmarks/results_models_bfc.md
	TF_ENABLE_ONEDNN_OPTS=0 $(BIN)/python -m benchmarks.models --steps plain \
		--output benchmarks/results_models_onednn_off.md
	$(BIN)/python -m benchmarks.model_layers
	TF_ENABLE_ONEDNN_OPTS=0 $(BIN)/python -m benchmarks.model_layers \
		--output benchmarks/results_model_layers_onednn_off.md
	$(BIN)/python -m benchmarks.first_calls

clean:
	rm -rf $(VENV) $(MIN_VENV) build *.egg-info

# The wheel and sdist as users get them: built, their file lists checked, and the
# wheel installed in a bare venv (runtime dependencies only) where the README
# quickstart runs outside the source tree.
.PHONY: wheel-check
wheel-check: $(STAMP)
	rm -rf dist kerasbn.egg-info  # a stale egg-info's file list would leak into the sdist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python tools/check_dist.py dist
	$(BIN)/python tools/quickstart_from_wheel.py dist
