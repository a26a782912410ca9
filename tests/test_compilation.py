"""XLA compilations (not traces) of our kernels, counted in a subprocess.

Inference never compiles a kernel of ours; a training kernel compiles for an
input shape only after `warmup_calls` training calls at that shape, and for at
most `max_shapes` shapes (then a one-time warning), and never for an input
under `min_elements` elements. Counted by XLA itself: the
worker runs with `--xla_dump_to`, where XLA writes one file per compiled program
(see tests/compilation/count_worker.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kerasbn import kernels

WORKER = Path(__file__).parent / "compilation" / "count_worker.py"


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compilations")
    dump, output = tmp / "dump", tmp / "counts.json"
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text")
    subprocess.run([sys.executable, str(WORKER), str(dump), str(output)], check=True, env=env, timeout=600)
    return json.loads(output.read_text())


KINDS = ["BatchNorm", "BatchRenorm", "GroupNorm", "GhostBatchNorm"]


@pytest.mark.parametrize("kind", KINDS)
def test_inference_at_new_batch_sizes_compiles_nothing(counts, kind):
    assert counts[f"{kind}: inference at 8 batch sizes"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_training_compiles_a_shape_once_it_recurs(counts, kind):
    assert counts[f"{kind}: 3 training steps at one shape"] == 0
    assert counts[f"{kind}: 2 more training steps at that shape"] >= 2  # forward and backward
    assert counts[f"{kind}: one training step at a new shape"] == 0


def test_at_most_max_shapes_are_compiled_with_one_warning(counts):
    assert counts["limit: recurring shape 8"] >= 2
    assert counts["limit: recurring shape 7"] >= 2
    assert counts["limit: recurring shape 6"] == 0
    assert counts["limit warnings"] == 1


def test_a_short_fit_with_a_partial_last_batch_compiles_nothing(counts):
    assert kernels.Policy().warmup_calls > 10
    assert counts["fit: 2 epochs of 5 steps, partial last batch"] == 0


def test_small_inputs_never_compile_and_large_ones_do_without_warm_up(counts):
    assert kernels.Policy().min_elements > 16 * 6 * 6 * 4
    assert kernels.Policy().min_elements <= 16 * 6 * 6 * 2048
    assert counts["threshold: 3 training steps, small input, shape known while tracing"] == 0
    assert counts["threshold: 3 training steps, large input, shape known while tracing"] >= 2
    assert counts["threshold: 5 training steps, small input, shape seen at run time"] == 0
