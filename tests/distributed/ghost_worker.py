"""Runs ghost batch norm layers with synchronized=True under MirroredStrategy.

Usage: python ghost_worker.py CASE.npz [CASE.npz ...]

Two logical CPU devices, one replica each, in this one process (the strategy is
created once for every case). Each CASE holds `x` (the global batch), `weight`
(loss weights, same shape), `mask` (or an empty array), `splits` (rows per
replica, which may differ), `layer` (a kerasbn class name) and `options` (JSON
keyword arguments of the layer). Each replica runs one training step on its rows
with loss sum(y * weight); `CASE.out.npz` gets the outputs and input gradients
of both replicas (concatenated in replica order), the gamma/beta gradients summed
over replicas, and every replica's copy of the moving statistics.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

STATISTICS = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


def make_strategy():
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def run_case(strategy, path):
    import kerasbn

    data = np.load(path, allow_pickle=False)
    x, weight, splits = data["x"], data["weight"], data["splits"]
    mask = data["mask"] if data["mask"].size else None
    bounds = np.concatenate([[0], np.cumsum(splits)])
    options = json.loads(str(data["options"]))

    with strategy.scope():
        layer = getattr(kerasbn, str(data["layer"]))(synchronized=True, **options)
        layer.build((None,) + x.shape[1:])

    def replica_value(values):
        return strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(
                values[bounds[context.replica_id_in_sync_group] : bounds[context.replica_id_in_sync_group + 1]]
            )
        )

    @tf.function
    def step(x_parts, weight_parts, mask_parts):
        def on_replica(x_part, weight_part, mask_part):
            with tf.GradientTape() as tape:
                tape.watch(x_part)
                y = layer(x_part, training=True, mask=mask_part)
                loss = tf.reduce_sum(y * weight_part)
            dx, dgamma, dbeta = tape.gradient(loss, [x_part, layer.gamma, layer.beta])
            dgamma, dbeta = tf.distribute.get_replica_context().all_reduce("sum", [dgamma, dbeta])
            return y, dx, dgamma, dbeta

        return strategy.run(on_replica, args=(x_parts, weight_parts, mask_parts))

    mask_parts = None if mask is None else replica_value(mask)
    y, dx, dgamma, dbeta = step(replica_value(x), replica_value(weight), mask_parts)
    local = strategy.experimental_local_results

    def replicas(variable):
        value = variable.value
        values = value.values if hasattr(value, "values") else [value]
        return np.stack([np.asarray(v) for v in values])

    results = {
        "y": np.concatenate([t.numpy() for t in local(y)]),
        "dx": np.concatenate([t.numpy() for t in local(dx)]),
        "dgamma": local(dgamma)[0].numpy(),
        "dbeta": local(dbeta)[0].numpy(),
    }
    for name in STATISTICS:
        if hasattr(layer, name):
            results[name] = replicas(getattr(layer, name))
    np.savez(str(path).replace(".npz", ".out.npz"), **results)


def main(paths):
    strategy = make_strategy()
    for path in paths:
        run_case(strategy, path)


if __name__ == "__main__":
    main(sys.argv[1:])
