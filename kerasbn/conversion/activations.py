"""Which Keras activation layers can be fused into a normalization layer.

A normalization layer's `activation=` takes Keras' activation function of one
of the names in `kerasbn.kernels.activations.ACTIVATIONS`, with its default
arguments. An activation layer fuses only if it computes exactly that
function, so the fused model gives the same outputs.
"""

import keras

from kerasbn.layers.arguments import check_activation


def fusable_activation(layer):
    """The canonical name of what `layer` computes, or None if it is not fusable.

    Only the exact classes `Activation`, `ReLU`, `LeakyReLU` and `ELU` qualify
    (a subclass may compute something else), and only with arguments that make
    them one of the fusable functions with its default arguments: `Activation`
    of such a function or name (not "linear": there is nothing to fuse);
    `ReLU` with `max_value` None ("relu") or 6 ("relu6"), `negative_slope` 0
    and `threshold` 0; `LeakyReLU` with `negative_slope` 0.2, the default of
    `keras.activations.leaky_relu` (not the layer's 0.3); `ELU` with `alpha` 1.
    """
    kind = type(layer)
    if kind is keras.layers.Activation:
        try:
            return check_activation(layer.activation)
        except ValueError:
            return None
    if kind is keras.layers.ReLU:
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else None
    if kind is keras.layers.LeakyReLU:
        return "leaky_relu" if float(layer.negative_slope) == 0.2 else None
    if kind is keras.layers.ELU:
        return "elu" if float(layer.alpha) == 1.0 else None
    return None
