"""Ghost batch norm with synchronized=True under MirroredStrategy (2 logical CPUs).

Ghost batches are cut within each replica's batch and normalized locally; only
the moving statistics are combined over replicas (the global batch's, under the
chosen rule) and are identical on every replica. All cases run in one
subprocess (tests/distributed/ghost_worker.py); references are float64 NumPy
and, where the ghost batches coincide, one device on the whole batch.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from test_ghost_batch_norm import ghost_reference, pooled_ghost_variance, whole_batch_statistics

WORKER = Path(__file__).parent / "distributed" / "ghost_worker.py"
TIMEOUT = 300
rng = np.random.default_rng(15)

CASES = {
    # Each replica holds two whole ghost batches: as one device on the whole batch.
    "aligned": dict(
        x=rng.normal(3.0, 2.0, (16, 3, 2)), splits=[8, 8], mask=None, layer="BatchNorm",
        options=dict(virtual_batch_size=4, momentum=0.5),
    ),
    # Uneven replicas and masks: ghost batches [0:4] [4:6] | [6:10] [10:14] [14:16].
    "uneven": dict(
        x=rng.normal(-1.0, 3.0, (16, 5, 2)), splits=[6, 10], mask=rng.random((16, 5)) > 0.3, layer="BatchNorm",
        options=dict(virtual_batch_size=4, momentum=0.5, moving_statistics="ghost_mean"),
    ),
    # Data far from the initial renorm averages: r and d are clipped per ghost batch.
    "renorm": dict(
        x=rng.normal(6.0, 3.0, (12, 4, 2)), splits=[5, 7], mask=None, layer="BatchRenorm",
        options=dict(virtual_batch_size=3, momentum=0.5, renorm_momentum=0.8, r_max=1.5, d_max=0.5),
    ),
}


def split(values, splits):
    return np.split(values, np.cumsum(splits)[:-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ghost_mirrored")
    paths = {}
    for name, case in CASES.items():
        case["x"] = case["x"].astype("float32")
        case["weight"] = rng.normal(size=case["x"].shape).astype("float32")
        paths[name] = directory / f"{name}.npz"
        np.savez(
            paths[name],
            x=case["x"],
            weight=case["weight"],
            splits=np.asarray(case["splits"]),
            mask=np.zeros(0) if case["mask"] is None else case["mask"],
            layer=np.asarray(case["layer"]),
            options=np.asarray(json.dumps(case["options"])),
        )
    subprocess.run([sys.executable, str(WORKER)] + [str(p) for p in paths.values()], check=True, timeout=TIMEOUT)
    return {name: dict(np.load(str(path).replace(".npz", ".out.npz"))) for name, path in paths.items()}


def single_device(case, rows=slice(None)):
    """One training step of the unsynchronized layer on `rows` of the case's batch."""
    layer = getattr(kerasbn, case["layer"])(**case["options"])
    x = tf.constant(case["x"][rows])
    mask = None if case["mask"] is None else tf.constant(case["mask"][rows])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, mask=mask)
        loss = tf.reduce_sum(y * case["weight"][rows])
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return {"y": y.numpy(), "dx": dx.numpy(), "dgamma": dgamma.numpy(), "dbeta": dbeta.numpy()}


def replicated(got, name):
    """The moving statistic `name`, checked identical on both replicas."""
    replicas = got[name]
    assert replicas.shape[0] == 2
    np.testing.assert_array_equal(replicas[0], replicas[1])
    return replicas[0]


def test_aligned_replicas_equal_one_device_on_the_whole_batch(results):
    got, case = results["aligned"], CASES["aligned"]
    expected = single_device(case)
    for name in ("y", "dx", "dgamma", "dbeta"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=2e-5)
    mean, var = whole_batch_statistics(case["x"])
    np.testing.assert_allclose(replicated(got, "moving_mean"), 0.5 * mean, rtol=1e-5)
    np.testing.assert_allclose(replicated(got, "moving_variance"), 0.5 + 0.5 * var, rtol=1e-5)


def test_ghost_batches_are_per_replica_and_moving_statistics_global(results):
    got, case = results["uneven"], CASES["uneven"]
    ghosts = []
    for x, mask, y, rows in zip(
        split(case["x"], case["splits"]),
        split(case["mask"], case["splits"]),
        split(got["y"], case["splits"]),
        (slice(0, 6), slice(6, 16)),
    ):
        expected, replica_ghosts = ghost_reference(x, 4, mask=mask)
        ghosts += replica_ghosts
        np.testing.assert_allclose(y[mask], expected[mask], rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(
            got["dx"][rows], single_device(case, rows)["dx"], rtol=1e-5, atol=2e-5
        )
    assert len(ghosts) == 5
    parts = [single_device(case, rows) for rows in (slice(0, 6), slice(6, 16))]
    for name in ("dgamma", "dbeta"):
        np.testing.assert_allclose(got[name], parts[0][name] + parts[1][name], rtol=1e-5, atol=2e-5)
    mean, _ = whole_batch_statistics(case["x"], mask=case["mask"])
    np.testing.assert_allclose(replicated(got, "moving_mean"), 0.5 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        replicated(got, "moving_variance"), 0.5 + 0.5 * pooled_ghost_variance(ghosts), rtol=1e-5
    )
    # One device on the whole batch cuts other ghost batches ([4:8] ...).
    assert not np.allclose(got["y"][6:], single_device(case)["y"][6:], atol=1e-3)


def test_batch_renorm_corrects_per_ghost_batch_with_global_moving_statistics(results):
    got, case = results["renorm"], CASES["renorm"]
    initial = (np.zeros(2), np.ones(2), 1.5, 0.5)  # renorm_mean, renorm_stddev, r_max, d_max
    for x, y in zip(split(case["x"], case["splits"]), split(got["y"], case["splits"])):
        expected, _ = ghost_reference(x, 3, renorm=initial)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=2e-5)
    mean, var = whole_batch_statistics(case["x"])
    stddev = np.sqrt(var + 1e-3)
    np.testing.assert_allclose(replicated(got, "moving_mean"), 0.5 * mean, rtol=1e-5)
    np.testing.assert_allclose(replicated(got, "moving_stddev"), 0.5 + 0.5 * stddev, rtol=1e-5)
    np.testing.assert_allclose(replicated(got, "renorm_mean"), 0.2 * mean, rtol=1e-5)
    np.testing.assert_allclose(replicated(got, "renorm_stddev"), 0.8 + 0.2 * stddev, rtol=1e-5)
