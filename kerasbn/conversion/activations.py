"""Which Keras activation layers can be fused into a normalization layer, and back.

A normalization layer's `activation=` argument takes one of `FUSABLE`: Keras'
activation function of that name with its default arguments. An activation
layer fuses only if it computes exactly that function, so the fused model
gives the same outputs.
"""

import keras

# Canonical names accepted by the layers' `activation=` argument.
FUSABLE = (
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "gelu",
    "silu",
    "hard_silu",
    "sigmoid",
    "hard_sigmoid",
    "tanh",
    "mish",
    "softplus",
)


def _functions_by_identity():
    # `keras.activations.get("swish")` is `silu` itself, so aliases resolve here.
    return {keras.activations.get(name): name for name in FUSABLE}


def fusable_activation(layer):
    """The canonical name of what `layer` computes, or None if it is not fusable.

    Only the exact classes `Activation`, `ReLU`, `LeakyReLU` and `ELU` qualify
    (a subclass may compute something else), and only with arguments that make
    them one of the `FUSABLE` functions with its defaults: `ReLU` with
    `max_value` None ("relu") or 6 ("relu6"), `negative_slope` 0 and
    `threshold` 0; `LeakyReLU` with `negative_slope` 0.2; `ELU` with `alpha` 1.
    """
    kind = type(layer)
    if kind is keras.layers.Activation:
        try:
            return _functions_by_identity().get(layer.activation)
        except TypeError:  # an unhashable callable
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


def activation_layer(name, normalization):
    """A `keras.layers.Activation(name)` to follow `normalization` in an unfused model.

    It gets the normalization layer's dtype policy, so under mixed precision it
    computes in the same dtype as the fused layer's output.
    """
    return keras.layers.Activation(
        name, dtype=normalization.dtype_policy, name=f"{normalization.name}_{name}"
    )
