"""A copy of a Keras model with its foldable batch norms folded away.

`keras.models.clone_model` rebuilds Functional and Sequential models (nested
ones too, with `recursive=True`) layer by layer through a `clone_function`:

- a producer that absorbs a batch norm is rebuilt from its config with
  `use_bias=True` and receives the folded kernel and bias;
- the batch norm becomes a `FoldedAway` layer of the same name: the identity,
  or the batch norm's fused activation (the activation stays; only the
  normalization folds away);
- every other layer is rebuilt from its config and receives the original's
  weights (a layer that cannot be rebuilt from its config is shared instead).

The original model is not modified. The copy is meant for inference only.
"""

import keras

from kerasbn.export import folding
from kerasbn.export.graph import find_fold_pairs


def _weight_values(layer, name):
    variable = getattr(layer, name, None)
    return None if variable is None else keras.ops.convert_to_numpy(variable)


def folded_weights(pair):
    """The producer's `(kernel, bias)` with the pair's batch norm folded in."""
    normalization = pair.normalization
    scale, shift = folding.batchnorm_affine(
        _weight_values(normalization, "moving_mean"),
        _weight_values(normalization, "moving_variance"),
        normalization.epsilon,
        gamma=_weight_values(normalization, "gamma"),
        beta=_weight_values(normalization, "beta"),
    )
    producer = pair.producer
    bias = _weight_values(producer, "bias") if getattr(producer, "use_bias", False) else None
    return folding.fold_affine_into_kernel(
        _weight_values(producer, "kernel"), bias, scale, shift, pair.layout
    )


def _producer_with_bias(layer):
    config = layer.get_config()
    config.update(
        use_bias=True, bias_initializer="zeros", bias_regularizer=None, bias_constraint=None
    )
    return layer.__class__.from_config(config)


class FoldedAway(keras.layers.Layer):
    """Stands for a batch norm folded into the layer before it.

    The identity, or `keras.activations.get(activation)` for a batch norm with
    a fused activation. Accepts the `training` and `mask` arguments a batch
    norm is called with, and passes the mask through.
    """

    def __init__(self, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.activation = activation

    def call(self, inputs, training=None, mask=None):
        if self.activation is None:
            return inputs
        return keras.activations.get(self.activation)(inputs)

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        return input_shape


def _replacement_for(layer):
    activation = getattr(layer, "activation", None)
    return FoldedAway(activation=activation, name=layer.name, dtype=layer.dtype_policy)


class _Cloner:
    """The `clone_function`, remembering what became of each original layer."""

    def __init__(self, pairs):
        self.producers = {id(p.producer): p for p in pairs}
        self.normalizations = {id(p.normalization) for p in pairs}
        self.copies = []  # (original, clone) whose weights must be copied
        self.folded = []  # (pair, clone of the producer)

    def __call__(self, layer):
        if id(layer) in self.normalizations:
            return _replacement_for(layer)
        if id(layer) in self.producers:
            clone = _producer_with_bias(layer)
            self.folded.append((self.producers[id(layer)], clone))
            return clone
        try:
            clone = layer.__class__.from_config(layer.get_config())
        except (NotImplementedError, TypeError, ValueError, KeyError):
            return layer  # shared: its weights are already right
        self.copies.append((layer, clone))
        return clone

    def transfer_weights(self):
        for original, clone in self.copies:
            clone.set_weights(original.get_weights())
        for pair, clone in self.folded:
            kernel, bias = folded_weights(pair)
            clone.kernel.assign(kernel)
            clone.bias.assign(bias)


def fold_batchnorm(model):
    """A copy of `model` for inference in which foldable batch norms are folded.

    Args:
      model: a built Functional or Sequential Keras model.

    Returns:
      `(copy, pairs)`: the copy and the list of `graph.FoldPair` that were
      folded. When nothing can be folded, `(model, [])` (the model itself).
    """
    pairs = find_fold_pairs(model)
    if not pairs:
        return model, []
    cloner = _Cloner(pairs)
    copy = keras.models.clone_model(model, clone_function=cloner, recursive=True)
    cloner.transfer_weights()
    return copy, pairs
