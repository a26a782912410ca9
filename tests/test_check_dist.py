"""tools/check_dist.py accepts exactly the package, its metadata and LICENSE, and names anything else."""

import pytest

from tools import check_dist

MODULES = check_dist.source_modules()
DIST_INFO = "kerasbn-0.1.0.dist-info"
GOOD_WHEEL = sorted(MODULES) + [
    f"{DIST_INFO}/METADATA",
    f"{DIST_INFO}/WHEEL",
    f"{DIST_INFO}/RECORD",
    f"{DIST_INFO}/top_level.txt",
    f"{DIST_INFO}/licenses/LICENSE",
]
SDIST_TOP = "kerasbn-0.1.0"
GOOD_SDIST = [
    f"{SDIST_TOP}/{name}"
    for name in sorted(MODULES)
    + ["LICENSE", "README.md", "CHANGELOG.md", "PKG-INFO", "setup.cfg", "pyproject.toml", "MANIFEST.in"]
    + ["kerasbn.egg-info/PKG-INFO", "kerasbn.egg-info/SOURCES.txt"]
]
STRAYS = [
    "tests/test_package.py",
    "benchmarks/run.py",
    "tutorials/01_quickstart.ipynb",
    "saved_models/golden/bn_conv/saved_model.pb",
    "kerasbn/__pycache__/schedules.cpython-311.pyc",
    "kerasbn/notes.txt",
]


def test_source_modules_are_the_package_python_files():
    assert {"kerasbn/__init__.py", "kerasbn/_version.py", "kerasbn/layers/batch_norm.py"} <= MODULES
    assert all(name.startswith("kerasbn/") and name.endswith(".py") for name in MODULES)
    assert not any("__pycache__" in name for name in MODULES)


def test_a_wheel_of_the_package_and_license_passes():
    assert check_dist.wheel_problems(GOOD_WHEEL, MODULES) == []


@pytest.mark.parametrize("stray", STRAYS)
def test_a_wheel_shipping_anything_else_fails_naming_it(stray):
    (problem,) = check_dist.wheel_problems(GOOD_WHEEL + [stray], MODULES)
    assert stray in problem and "not part of the package" in problem


@pytest.mark.parametrize("missing", [f"{DIST_INFO}/licenses/LICENSE", "kerasbn/layers/batch_norm.py"])
def test_a_wheel_lacking_license_or_a_module_fails_naming_it(missing):
    names = [name for name in GOOD_WHEEL if name != missing]
    assert check_dist.wheel_problems(names, MODULES) == [f"wheel lacks {missing}"]


def test_an_sdist_of_the_package_license_and_docs_passes():
    assert check_dist.sdist_problems(GOOD_SDIST, MODULES) == []


@pytest.mark.parametrize("stray", STRAYS)
def test_an_sdist_shipping_anything_else_fails_naming_it(stray):
    (problem,) = check_dist.sdist_problems(GOOD_SDIST + [f"{SDIST_TOP}/{stray}"], MODULES)
    assert stray in problem and "not part of the package" in problem


@pytest.mark.parametrize("missing", ["LICENSE", "CHANGELOG.md", "kerasbn/export/folding.py"])
def test_an_sdist_lacking_license_docs_or_a_module_fails_naming_it(missing):
    names = [name for name in GOOD_SDIST if name != f"{SDIST_TOP}/{missing}"]
    assert check_dist.sdist_problems(names, MODULES) == [f"sdist lacks {missing}"]
