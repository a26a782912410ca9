"""Runs synchronized layers under a tf.distribute strategy and saves what they did.

Usage: python sync_worker.py INPUT.npz OUTPUT.npz [--multi-worker]

INPUT holds `x` (the global batch), `weight` (loss weights, same shape), `mask`
(or an empty array) and `splits` (the number of rows each replica gets, which may
differ). Each replica runs one training step of `layer_class(synchronized=True)`
on its rows with loss sum(y * weight); OUTPUT gets the outputs and input
gradients of this process' replicas (concatenated in replica order), the summed
gamma/beta gradients, and the moving statistics of every local replica.

With --multi-worker, TF_CONFIG must describe a cluster of one worker per process,
each owning one replica; otherwise two logical CPU devices share one process.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def make_strategy(multi_worker):
    if multi_worker:
        return tf.distribute.MultiWorkerMirroredStrategy()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def main(input_path, output_path, multi_worker):
    strategy = make_strategy(multi_worker)
    import kerasbn

    data = np.load(input_path, allow_pickle=False)
    x, weight, splits = data["x"], data["weight"], data["splits"]
    mask = data["mask"] if data["mask"].size else None
    layer_name = str(data["layer"]) if "layer" in data else "BatchNorm"
    bounds = np.concatenate([[0], np.cumsum(splits)])

    def rows(values, replica):
        return values[bounds[replica] : bounds[replica + 1]]

    with strategy.scope():
        layer = getattr(kerasbn, layer_name)(synchronized=True, momentum=0.5)
        layer.build((None,) + x.shape[1:])

    def replica_value(values):
        return strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(rows(values, context.replica_id_in_sync_group))
        )

    @tf.function
    def step(x_parts, weight_parts, mask_parts):
        def on_replica(x_part, weight_part, mask_part):
            with tf.GradientTape() as tape:
                tape.watch(x_part)
                y = layer(x_part, training=True, mask=mask_part)
                loss = tf.reduce_sum(y * weight_part)
            dx, dgamma, dbeta = tape.gradient(loss, [x_part, layer.gamma, layer.beta])
            context = tf.distribute.get_replica_context()
            dgamma, dbeta = context.all_reduce("sum", [dgamma, dbeta])
            return y, dx, dgamma, dbeta

        return strategy.run(on_replica, args=(x_parts, weight_parts, mask_parts))

    mask_parts = None if mask is None else replica_value(mask)
    y, dx, dgamma, dbeta = step(replica_value(x), replica_value(weight), mask_parts)
    local = strategy.experimental_local_results

    def moving(variable):
        value = variable.value
        values = value.values if hasattr(value, "values") else [value]
        return np.stack([np.asarray(v) for v in values])

    np.savez(
        output_path,
        y=np.concatenate([t.numpy() for t in local(y)]),
        dx=np.concatenate([t.numpy() for t in local(dx)]),
        dgamma=local(dgamma)[0].numpy(),
        dbeta=local(dbeta)[0].numpy(),
        moving_mean=moving(layer.moving_mean),
        moving_variance=moving(layer.moving_variance),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--multi-worker" in sys.argv[3:])
