"""Shared test set-up: TensorFlow backend, quiet logs, reproducible seeds."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts with the float32 policy and fresh layer names.

    Without `gc.collect()` (`free_memory=False`): a full collection cost 0.5 s
    or more per test once TensorFlow's objects pile up (5 minutes of the
    suite); Python's own collector still runs as usual.
    """
    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session(free_memory=False)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def onednn_reported_off():
    """Kernels traced in the test take the path for oneDNN off (the policy's
    `platform`): our own ops and XLA programs for every BatchNorm (with oneDNN
    on, float32 NHWC training calls of a static shape are TensorFlow's fused
    op, `test_fused_training.py`)."""
    from kerasbn import kernels

    with kernels.xla_policy(platform="cpu"):
        yield


@pytest.fixture
def onednn_reported_on():
    """Kernels traced in the test take the oneDNN path: a BatchNorm on float32
    NHWC trains with TensorFlow's fused op (which runs with oneDNN off too, as
    TensorFlow's own kernel), at every size here, so small inputs test it (the
    package keeps its own ops under `Policy.fused_min_elements`: see
    `onednn_reported_on_at_its_threshold`)."""
    from kerasbn import kernels

    with kernels.xla_policy(platform="cpu-onednn", fused_min_elements=0):
        yield


@pytest.fixture
def onednn_reported_on_at_its_threshold():
    """The oneDNN path with the package's own size threshold for the fused op."""
    from kerasbn import kernels

    with kernels.xla_policy(platform="cpu-onednn"):
        yield
