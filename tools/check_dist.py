"""Checks the file lists of the built wheel and sdist: the package and its license, nothing else.

Usage: python tools/check_dist.py DIST_DIR

DIST_DIR must hold exactly one wheel and one sdist (what `python -m build` writes).
Exits with status 1, printing one line per problem, if either lacks LICENSE or a
module of kerasbn/, or ships anything else: tests, benchmarks, notebooks, saved
models, caches, stray files.
"""

import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "kerasbn"
LICENSE_FILES = ("LICENSE",)
WHEEL_METADATA = ("METADATA", "WHEEL", "RECORD", "top_level.txt")
SDIST_FILES = ("PKG-INFO", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "CHANGELOG.md")
SDIST_EGG_INFO = f"{PACKAGE}.egg-info/"  # setuptools' metadata: its file list varies by version


def source_modules(root=ROOT):
    """The package's modules in the source tree, as POSIX paths relative to `root`."""
    return {
        path.relative_to(root).as_posix()
        for path in (root / PACKAGE).rglob("*.py")
        if "__pycache__" not in path.parts
    }


def wheel_problems(names, modules):
    """What is wrong with a wheel holding `names`, given the package's `modules`.

    Args:
        names: the wheel's member paths.
        modules: the modules the wheel must hold (see `source_modules`).

    Returns:
        A list of problems, empty if the wheel holds exactly the modules, its
        metadata and the license files.
    """
    names = set(names)
    dist_infos = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
    if len(dist_infos) != 1:
        return [f"wheel: expected one .dist-info directory, found {sorted(dist_infos)}"]
    (dist_info,) = dist_infos
    expected = set(modules)
    expected |= {f"{dist_info}/{name}" for name in WHEEL_METADATA}
    expected |= {f"{dist_info}/licenses/{name}" for name in LICENSE_FILES}
    return [f"wheel ships {name}, which is not part of the package" for name in sorted(names - expected)] + [
        f"wheel lacks {name}" for name in sorted(expected - names)
    ]


def sdist_problems(names, modules):
    """What is wrong with an sdist holding `names` (files only), given the package's `modules`.

    Args:
        names: the sdist's file paths, each under its one top directory.
        modules: the modules the sdist must hold (see `source_modules`).

    Returns:
        A list of problems, empty if the sdist holds exactly the modules, the
        license files, the build configuration (setup.cfg, pyproject.toml,
        MANIFEST.in), README, CHANGELOG and setuptools' metadata.
    """
    tops = {name.split("/")[0] for name in names}
    if len(tops) != 1:
        return [f"sdist: expected one top directory, found {sorted(tops)}"]
    (top,) = tops
    relative = {name[len(top) + 1 :] for name in names}
    expected = set(modules) | set(LICENSE_FILES) | set(SDIST_FILES)
    unexpected = {name for name in relative - expected if not name.startswith(SDIST_EGG_INFO)}
    return [f"sdist ships {name}, which is not part of the package" for name in sorted(unexpected)] + [
        f"sdist lacks {name}" for name in sorted(expected - relative)
    ]


def _only(dist_dir, pattern):
    found = sorted(Path(dist_dir).glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"{dist_dir}: expected one {pattern}, found {[p.name for p in found]}")
    return found[0]


def main(argv):
    if len(argv) != 1:
        raise SystemExit(__doc__)
    modules = source_modules()
    wheel = _only(argv[0], "*.whl")
    sdist = _only(argv[0], "*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        wheel_names = [name for name in archive.namelist() if not name.endswith("/")]
    with tarfile.open(sdist) as archive:
        sdist_names = [member.name for member in archive.getmembers() if member.isfile()]
    problems = wheel_problems(wheel_names, modules) + sdist_problems(sdist_names, modules)
    for name, names in ((wheel.name, wheel_names), (sdist.name, sdist_names)):
        print(f"{name}: {len(names)} files")
        print("".join(f"  {n}\n" for n in sorted(names)), end="")
    if problems:
        print("".join(f"PROBLEM: {p}\n" for p in problems), end="", file=sys.stderr)
        return 1
    print(f"wheel and sdist hold the {len(modules)} modules of {PACKAGE}/ and {', '.join(LICENSE_FILES)}, nothing else")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
