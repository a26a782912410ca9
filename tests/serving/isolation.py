"""Running a process in which `import kerasbn` fails.

The process starts in a temporary working directory (so the repository is not
on its path) with a directory first on PYTHONPATH whose `kerasbn.py` raises
ImportError, which shadows the installed package.
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOADER = HERE / "load_saved_models.py"
SAVED_MODEL_CLI = Path(sys.executable).with_name("saved_model_cli")


def isolated_environment(tmp_path):
    """`(env, cwd)` for a subprocess that cannot import kerasbn."""
    shadow = Path(tmp_path) / "no_kerasbn"
    shadow.mkdir(exist_ok=True)
    (shadow / "kerasbn.py").write_text(
        'raise ImportError("kerasbn is deliberately unavailable in this process")\n'
    )
    cwd = Path(tmp_path) / "cwd"
    cwd.mkdir(exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("KERAS_BACKEND", None)
    return env, cwd


def run_isolated(args, tmp_path, timeout=300):
    """Runs `args` without kerasbn; returns the CompletedProcess, asserting success."""
    env, cwd = isolated_environment(tmp_path)
    process = subprocess.run(
        [str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert process.returncode == 0, (
        f"{args} failed ({process.returncode}):\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
    )
    return process


def load_in_fresh_process(roots, tmp_path):
    """`{"<root>/<method>/<output>": array}` from `load_saved_models.py`."""
    import numpy as np

    output = Path(tmp_path) / "loaded.npz"
    run_isolated([sys.executable, LOADER, output, *roots], tmp_path)
    with np.load(output) as data:
        return {key: data[key] for key in data.files}


def saved_model_cli_run(saved_model, inputs, tmp_path):
    """`saved_model_cli run` of `serving_default`: `{output name: array}`.

    `inputs` maps input names to `.npy` files.
    """
    import numpy as np

    outdir = Path(tmp_path) / f"cli_{Path(saved_model).parent.name}"
    spec = ";".join(f"{name}={path}" for name, path in inputs.items())
    run_isolated(
        [
            SAVED_MODEL_CLI, "run", "--dir", saved_model, "--tag_set", "serve",
            "--signature_def", "serving_default", "--inputs", spec,
            "--outdir", outdir, "--overwrite",
        ],
        tmp_path,
    )
    return {p.stem: np.load(p) for p in sorted(outdir.glob("*.npy"))}
