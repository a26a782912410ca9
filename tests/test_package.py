"""Import-time behaviour of the package, and its version."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import kerasbn

CHANGELOG = Path(__file__).parent.parent / "CHANGELOG.md"


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


def test_version_is_the_installed_distributions():
    installed = importlib.metadata.version("kerasbn")
    assert kerasbn.__version__ == installed, "reinstall (make install) after changing kerasbn/_version.py"


def test_version_is_the_changelogs_latest_release():
    headings = re.findall(r"^## \[([^\]]+)\]", CHANGELOG.read_text(), flags=re.M)
    releases = [heading for heading in headings if heading != "Unreleased"]
    assert releases, "CHANGELOG.md has no release heading"
    assert kerasbn.__version__ == releases[0]
