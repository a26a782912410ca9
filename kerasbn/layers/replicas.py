"""The cross-replica sum a synchronized layer needs, if any."""

import tensorflow as tf


def cross_replica_sum():
    """A function summing a list of tensors over replicas, or None.

    None outside a `tf.distribute` strategy, in cross-replica context, or with a
    single replica: the layer then behaves as `synchronized=False`.
    """
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None

    def all_reduce(tensors):
        return context.all_reduce(tf.distribute.ReduceOp.SUM, list(tensors))

    return all_reduce
