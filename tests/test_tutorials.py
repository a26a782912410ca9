"""The tutorial notebooks run from top to bottom, and are committed executed.

`test_notebook_runs` executes a copy of every `tutorials/*.ipynb` (new notebooks
are picked up by the glob) with nbclient, in its short mode (`KERASBN_QUICK=1`),
with the tutorials directory as working directory; the committed file is never
modified. The executed copy is left in pytest's temporary directory for
inspection. The other tests only read the committed files: every code cell was
executed, in order, without errors or TensorFlow's C++ log noise, and a
notebook that plots shows at least one image.
"""

import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT = 180  # seconds per cell
NOTEBOOK_TIMEOUT = 180  # seconds per notebook, kernel start-up included: the 3 minutes the tutorials promise on 2 cores

# TensorFlow's C++ logging (and friends) that executed notebooks are cleaned of.
LOG_NOISE = re.compile(
    r"^(\S*[IWE]\d{4} .*|WARNING: All log messages before absl.*|.*oneDNN custom operations.*"
    r"|.*TF_ENABLE_ONEDNN_OPTS.*|To enable the following instructions.*|.*rebuild TensorFlow.*)$",
    flags=re.M,
)

by_name = pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.strip()]


def test_there_are_tutorials():
    assert NOTEBOOKS, f"no notebooks in {TUTORIALS}"


@by_name
@pytest.mark.timeout(NOTEBOOK_TIMEOUT)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("KERASBN_QUICK", "1")
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    notebook = nbformat.read(copy, as_version=4)
    # "python3" runs this interpreter: jupyter_client replaces a kernelspec's
    # `python` by sys.executable.
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"{path.name} failed (executed copy: {copy}):\n{error}", pytrace=False)
    finally:
        nbformat.write(notebook, copy)
    for cell in code_cells(notebook):
        errors = [out for out in cell.outputs if out.output_type == "error"]
        assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"


def test_notebooks_run_on_this_interpreter():
    """The kernel nbclient starts is the interpreter running the tests."""
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    assert argv0 in {"python", "python3", sys.executable} or Path(argv0).resolve() == Path(sys.executable).resolve()


@by_name
def test_notebook_is_committed_executed(path):
    notebook = nbformat.read(path, as_version=4)
    cells = code_cells(notebook)
    assert cells, f"{path.name} has no code"
    counts = [cell.execution_count for cell in cells]
    assert None not in counts, f"{path.name}: code cells without an execution count: {counts}"
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: not executed in one run from the top: {counts}"
    for index, cell in enumerate(cells, start=1):
        for out in cell.outputs:
            assert out.output_type != "error", f"{path.name}, code cell {index}: {out.ename}: {out.evalue}"
            if out.output_type == "stream":
                noise = LOG_NOISE.search(out.text)
                assert noise is None, f"{path.name}, code cell {index}: log noise {noise.group(0)!r}"
    assert any(cell.outputs for cell in cells), f"{path.name} has no outputs"
    if any("plt." in cell.source or "matplotlib" in cell.source for cell in cells):
        images = [
            out
            for cell in cells
            for out in cell.outputs
            if out.output_type in {"display_data", "execute_result"} and "image/png" in out.get("data", {})
        ]
        assert images, f"{path.name} plots, but its committed outputs hold no image"


@by_name
def test_notebook_has_a_quick_mode(path):
    """The first code cell reads KERASBN_QUICK, so the suite can run it short."""
    first = code_cells(nbformat.read(path, as_version=4))[0]
    assert "KERASBN_QUICK" in first.source
