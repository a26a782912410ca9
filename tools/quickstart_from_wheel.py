"""Installs the built wheel in a bare venv and runs the README quickstart there.

Usage: python tools/quickstart_from_wheel.py DIST_DIR

The venv, in a temporary directory outside the source tree, gets the wheel and
its runtime dependencies only (versions pinned by constraints.txt), installed by
this Python's pip (`pip --python`: the venv itself has no pip). The
quickstart, the ```python block with `import kerasbn` under README.md's
"## Quickstart" heading, runs there in isolated mode (`python -I`: no script
directory, no PYTHONPATH, no user site), so nothing from the source tree can be
imported: a module missing from the wheel or an undeclared dependency fails
here. After the README's code the model trains a step, is saved and loaded, and
the script checks that kerasbn came from the venv with the distribution's
version. The temporary directory is removed at the end, pass or fail.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECKS = '''
# Appended by tools/quickstart_from_wheel.py: kerasbn came from the installed
# wheel, and the quickstart's model trains, saves and loads.
import importlib.metadata
import pathlib
import sysconfig

import numpy as np

site_packages = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
origin = pathlib.Path(kerasbn.__file__).resolve()
assert origin.is_relative_to(site_packages), f"kerasbn imported from {origin}, not from {site_packages}"
installed = importlib.metadata.version("kerasbn")
assert kerasbn.__version__ == installed, f"kerasbn.__version__ {kerasbn.__version__} != metadata {installed}"
rng = np.random.default_rng(0)
x = rng.normal(size=(8,) + tuple(model.input_shape[1:])).astype("float32")
y = rng.integers(0, model.output_shape[-1], size=8)
model.fit(x, y, batch_size=4, epochs=1, verbose=0)
model.save("model.keras")
loaded = keras.models.load_model("model.keras")
np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
print(f"kerasbn {kerasbn.__version__} from {origin}: README quickstart, fit, save and load passed")
'''


def quickstart_code(readme):
    """The ```python block containing `import kerasbn` in the README's "## Quickstart" section.

    Args:
        readme: the README's Markdown text.

    Returns:
        The block's code.

    Raises:
        ValueError: if there is no such section, or not exactly one such block in it.
    """
    section = re.search(r"^## Quickstart\n(.*?)(?=^## |\Z)", readme, flags=re.M | re.S)
    if section is None:
        raise ValueError("README.md has no '## Quickstart' section")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section.group(1), flags=re.S) if "import kerasbn" in b]
    if len(blocks) != 1:
        raise ValueError(f"README.md's Quickstart has {len(blocks)} ```python blocks with `import kerasbn`, not one")
    return blocks[0]


def _run(command, **kwargs):
    print("+", " ".join(str(c) for c in command), flush=True)
    start = time.monotonic()
    subprocess.run(command, check=True, **kwargs)
    print(f"  ({time.monotonic() - start:.0f} s)", flush=True)


def main(argv):
    if len(argv) != 1:
        raise SystemExit(__doc__)
    wheels = sorted(Path(argv[0]).resolve().glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"{argv[0]}: expected one wheel, found {[w.name for w in wheels]}")
    code = quickstart_code((ROOT / "README.md").read_text()) + CHECKS
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    with tempfile.TemporaryDirectory(prefix="kerasbn-wheel-check-", dir=_scratch_parent()) as tmp:
        tmp = Path(tmp).resolve()
        if tmp.is_relative_to(ROOT):
            raise SystemExit(f"the temporary directory {tmp} is inside the source tree {ROOT}")
        _bare_venv_quickstart(wheels[0], code, tmp, env)
        removing = time.monotonic()
    print(f"removed the bare venv ({time.monotonic() - removing:.0f} s)")
    return 0


def _scratch_parent(room=8 * 2**30):
    """Where the temporary directory goes: memory (/dev/shm) if it and RAM have `room`, else TMPDIR's default.

    The bare venv holds about 2.5 GB, mostly TensorFlow; deleting it from this
    machine's disk took 50 to 100 s, from memory 2 s. An explicit TMPDIR wins.
    """
    shm = Path("/dev/shm")
    if "TMPDIR" in os.environ or not (shm.is_dir() and os.access(shm, os.W_OK)):
        return None
    available = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    ram = int(available["MemAvailable"].split()[0]) * 1024
    return str(shm) if min(shutil.disk_usage(shm).free, ram) >= room else None


def _bare_venv_quickstart(wheel, code, tmp, env):
    """Installs `wheel` in a venv under `tmp` (pip runs from this venv) and runs `code` there."""
    python = tmp / "venv" / "bin" / "python"
    (tmp / "quickstart.py").write_text(code)
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile"]
    try:
        _run([sys.executable, "-m", "venv", "--without-pip", tmp / "venv"], env=env)
        _run(pip + ["-c", ROOT / "constraints.txt", wheel], env=env, cwd=tmp)
        _run([python, "-I", tmp / "quickstart.py"], env=env, cwd=tmp)
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"FAILED (exit status {error.returncode}): the wheel in a bare venv") from None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
