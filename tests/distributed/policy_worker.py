"""Prints, as JSON, the XLA policy each of two MirroredStrategy replicas sees inside an
`xla_policy` block of the calling thread, after each replica set a field of its own.

Usage: python policy_worker.py   (two logical CPU devices share this process)
"""

import json
import os
import threading

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def main():
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    from kerasbn import kernels

    seen = {}

    def replica():
        replica_id = int(tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group))
        kernels.set_xla_policy(min_elements=100 + replica_id)
        seen[replica_id] = dict(kernels.get_xla_policy(), thread=threading.get_ident())
        return tf.constant(0.0)

    with kernels.jit_disabled(), kernels.xla_policy(max_shapes=3):
        tf.function(lambda: strategy.run(replica))()
        inside = kernels.get_xla_policy()
    print(json.dumps({"replicas": seen, "caller": inside, "after": kernels.get_xla_policy(),
                      "caller_thread": threading.get_ident()}))


if __name__ == "__main__":
    main()
