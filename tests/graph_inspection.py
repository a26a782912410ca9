"""Which ops a traced graph holds, its functions' bodies included."""

import tensorflow as tf


def graph_op_types(graph):
    """The op types of `graph` and of every function in its library."""
    types = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        types |= {node.op for node in function.node_def}
    return types


def training_step_op_types(layer, shape, dtype=tf.float32, jit_compile=False):
    """Op types of a traced training step of `layer` (forward and backward)."""

    @tf.function(jit_compile=jit_compile)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y)  # on the tape: the step has a backward
        gradient = tape.gradient(loss, x)
        assert gradient is not None
        return gradient

    return graph_op_types(step.get_concrete_function(tf.TensorSpec(shape, dtype)).graph)
