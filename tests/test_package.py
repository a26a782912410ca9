"""Import-time behaviour of the package."""

import os
import subprocess
import sys

import kerasbn


def test_public_names():
    for name in ("BatchNorm", "__version__"):
        assert hasattr(kerasbn, name)


def test_refuses_non_tensorflow_backend_with_instructions():
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run(
        [sys.executable, "-c", "import kerasbn"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "KERAS_BACKEND=tensorflow" in result.stderr
    assert "'jax'" in result.stderr
