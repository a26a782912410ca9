"""Traced training steps of a layer, and which ops a traced graph holds."""

import keras
import tensorflow as tf


def graph_op_types(graph):
    """The op types of `graph` and of every function in its library."""
    types = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        types |= {node.op for node in function.node_def}
    return types


def training_step(layer, activation=None):
    """A traced step `(x, w) -> (y, [dx, *d_weights])` of the loss `sum(y * w)`.

    `activation` (a Keras activation name) is applied to the layer's output
    first, as a layer of its own would be.
    """
    apply = keras.activations.get(activation)

    @tf.function
    def step(x, w):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = apply(layer(x, training=True))
            loss = tf.reduce_sum(y * w)
        return y, tape.gradient(loss, [x] + list(layer.trainable_weights))

    return step


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
