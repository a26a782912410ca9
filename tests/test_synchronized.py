"""synchronized=True under MirroredStrategy and MultiWorkerMirroredStrategy.

The strategies need their own processes (logical devices must be configured
before TensorFlow starts; multi-worker needs one process per worker), so each
case runs tests/distributed/sync_worker.py and compares what it saved with a
single-device layer on the whole batch and with float64 NumPy.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from references import batch_norm_reference

WORKER = Path(__file__).parent / "distributed" / "sync_worker.py"
TIMEOUT = 240


def write_case(path, x, splits, mask=None, layer="BatchNorm", seed=0):
    weight = np.random.default_rng(seed).normal(size=x.shape).astype("float32")
    np.savez(
        path,
        x=x,
        weight=weight,
        splits=np.asarray(splits),
        mask=np.zeros(0) if mask is None else mask,
        layer=np.asarray(layer),
    )
    return weight


def single_device_step(x, weight, mask=None, layer_class=kerasbn.BatchNorm):
    layer = layer_class(momentum=0.5)
    layer.build((None,) + x.shape[1:])
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True, mask=mask)
        loss = tf.reduce_sum(y * weight)
    dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])
    return {
        "y": y.numpy(),
        "dx": dx.numpy(),
        "dgamma": dgamma.numpy(),
        "dbeta": dbeta.numpy(),
        "moving_mean": layer.moving_mean.numpy(),
        "moving_variance": layer.moving_variance.numpy(),
    }


def run_mirrored(tmp_path, x, splits, mask=None, layer="BatchNorm"):
    case = tmp_path / "case.npz"
    weight = write_case(case, x, splits, mask, layer=layer)
    out = tmp_path / "out.npz"
    subprocess.run(
        [sys.executable, str(WORKER), str(case), str(out)], check=True, timeout=TIMEOUT
    )
    return dict(np.load(out)), weight


def assert_matches_single_device(got, reference, atol=2e-5):
    np.testing.assert_allclose(got["y"], reference["y"], atol=atol)
    np.testing.assert_allclose(got["dx"], reference["dx"], atol=atol)
    np.testing.assert_allclose(got["dgamma"], reference["dgamma"], rtol=1e-4, atol=atol)
    np.testing.assert_allclose(got["dbeta"], reference["dbeta"], rtol=1e-4, atol=atol)
    for name in ("moving_mean", "moving_variance"):
        replicas = got[name]
        np.testing.assert_array_equal(replicas, np.broadcast_to(replicas[0], replicas.shape))
        np.testing.assert_allclose(replicas[0], reference[name], rtol=1e-5, atol=1e-6)


def test_mirrored_uneven_split_equals_single_device_on_whole_batch(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (13, 4, 3)).astype("float32")
    got, weight = run_mirrored(tmp_path, x, splits=[5, 8])
    assert_matches_single_device(got, single_device_step(x, weight))
    expected, mean, var = batch_norm_reference(x, None, None, 1e-3, -1)
    np.testing.assert_allclose(got["y"], expected, atol=2e-5)
    np.testing.assert_allclose(got["moving_variance"][0], 0.5 + 0.5 * var, rtol=1e-5)


def test_mirrored_masked_counts_differ_between_replicas(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(-1.0, 3.0, (8, 6, 2)).astype("float32")
    mask = rng.random((8, 6)) > 0.3
    mask[:4, 3:] = False  # the first replica sees far fewer positions
    got, weight = run_mirrored(tmp_path, x, splits=[4, 4], mask=mask)
    assert_matches_single_device(got, single_device_step(x, weight, mask=mask))


def test_mirrored_batch_renorm_equals_single_device_on_whole_batch(tmp_path):
    # Data far from the initial renorm statistics: r and d are active (d clipped).
    rng = np.random.default_rng(4)
    x = rng.normal(7.0, 2.0, (12, 3, 2)).astype("float32")
    mask = rng.random((12, 3)) > 0.2
    got, weight = run_mirrored(tmp_path, x, splits=[5, 7], mask=mask, layer="BatchRenorm")
    expected = single_device_step(x, weight, mask=mask, layer_class=kerasbn.BatchRenorm)
    assert_matches_single_device(got, expected)


def test_mirrored_statistics_stay_stable_at_large_mean(tmp_path):
    rng = np.random.default_rng(2)
    x = (1e4 + rng.normal(size=(64, 3))).astype("float32")
    got, _ = run_mirrored(tmp_path, x, splits=[32, 32])
    expected, mean, var = batch_norm_reference(x, None, None, 1e-3, -1)
    np.testing.assert_allclose(got["y"], expected, atol=5e-3)
    np.testing.assert_allclose(got["moving_variance"][0], 0.5 + 0.5 * var, rtol=2e-3)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_equals_single_device_on_whole_batch(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, (10, 5, 3)).astype("float32")
    case = tmp_path / "case.npz"
    weight = write_case(case, x, splits=[4, 6])
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        )
        out = tmp_path / f"out{index}.npz"
        processes.append(
            subprocess.Popen([sys.executable, str(WORKER), str(case), str(out), "--multi-worker"], env=env)
        )
    try:
        for process in processes:
            assert process.wait(timeout=TIMEOUT) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    parts = [dict(np.load(tmp_path / f"out{index}.npz")) for index in range(2)]
    got = {
        "y": np.concatenate([p["y"] for p in parts]),
        "dx": np.concatenate([p["dx"] for p in parts]),
        "dgamma": parts[0]["dgamma"],
        "dbeta": parts[0]["dbeta"],
        "moving_mean": np.concatenate([p["moving_mean"] for p in parts]),
        "moving_variance": np.concatenate([p["moving_variance"] for p in parts]),
    }
    assert_matches_single_device(got, single_device_step(x, weight))
    np.testing.assert_array_equal(parts[1]["dgamma"], parts[0]["dgamma"])


def test_fit_under_mirrored_strategy_equals_single_device_fit(tmp_path, rng):
    sys.path.insert(0, str(WORKER.parent))
    try:
        import fit_worker
    finally:
        sys.path.pop(0)
    x = rng.normal(1.0, 2.0, (64, 6, 6, 2)).astype("float32")
    y = rng.normal(size=(64, 2)).astype("float32")
    single = fit_worker.build_model(lambda: kerasbn.BatchNorm(momentum=0.8))
    initial = single.get_weights()
    np.savez(tmp_path / "case.npz", x=x, y=y, **{f"weights_{i}": w for i, w in enumerate(initial)})
    subprocess.run(
        [sys.executable, str(WORKER.parent / "fit_worker.py"), str(tmp_path / "case.npz"), str(tmp_path / "out.npz")],
        check=True,
        timeout=TIMEOUT,
    )
    mirrored = np.load(tmp_path / "out.npz")
    expected = fit_worker.train(single, x, y)
    assert not np.allclose(expected[0], initial[0])  # the conv kernel trained
    for index, want in enumerate(expected):
        np.testing.assert_allclose(mirrored[f"weights_{index}"], want, rtol=1e-4, atol=1e-5)
