"""`kerasbn.to_keras`: a model with our layers replaced by Keras' own."""

import keras

from kerasbn.conversion import configs, keras_graph, weights
from kerasbn.conversion.layer_kinds import (
    KERAS_BATCH_NORM,
    KERAS_GROUP_NORM,
    OUR_NORMALIZATIONS,
    base_class,
)
from kerasbn.conversion.rebuild import Rebuilder
from kerasbn.layers import BatchNorm, BatchRenorm, GroupNorm


def to_keras(model):
    """Returns a copy of `model` with kerasbn's layers replaced by Keras' own.

    For handing a model trained with kerasbn to someone without it: the result
    uses only Keras layers and computes the same outputs, in training and
    inference, with the same weights, names, `trainable` flags and dtype
    policies. `kerasbn.BatchNorm` becomes `keras.layers.BatchNormalization`,
    `kerasbn.BatchRenorm` becomes `keras.layers.BatchNormalization(renorm=True,
    renorm_clipping={"rmax": r_max, "rmin": 1 / r_max, "dmax": d_max})`
    (Keras 3.14 or later; its step counter is dropped), and `kerasbn.GroupNorm`
    becomes `keras.layers.GroupNormalization`. A fused activation
    (`activation=...`) becomes a `keras.layers.Activation` layer right after
    the normalization, named `<layer name>_<activation>` (with a suffix `_1`,
    `_2`, ... if the model has a layer of that name). Nested Functional
    and Sequential models are converted too; `model` is not modified.
    `to_keras(kerasbn.convert(m))` gives back `m`'s layers, names and weights
    (with fused activations as `Activation` layers). A KerasHub backbone or
    task keeps its class: it is rebuilt by its class with Keras' layers,
    and each of ours must be what that code creates (a `ValueError` naming
    the layer otherwise, e.g. for a `GroupNorm` where the class creates a
    `BatchNormalization`).

    Args:
      model: a Functional or Sequential `keras.Model` (nested ones included).
        `TypeError` if not a Keras 3 model; `ValueError` for a subclassed model
        (or one nested in `model` that contains our layers), or an unbuilt
        Sequential model.

    Returns:
      A new model of the same kind with the same inputs and outputs.

    Raises:
      TypeError: `model` is not a Keras 3 model.
      ValueError: naming the layer, for a layer Keras has no exact equivalent
        of: a `BatchRenorm` with an `r_max` or `d_max` schedule (Keras' clipping
        is fixed), any `BatchRenorm` on Keras < 3.14 (no `renorm` there), a
        layer normalizing over several axes, a `GroupNorm` that receives a mask
        (Keras' `GroupNormalization` ignores masks, so it would compute
        something else), a masked `BatchNorm` whose feature axis is not the
        last one (Keras' layer assumes it is), a subclassed model, or our
        layer inside another layer (e.g. `TimeDistributed`).
    """
    return _ToKeras()(model)


class _ToKeras(Rebuilder):
    def __init__(self):
        super().__init__()
        self.activations = {}  # id(our layer) -> its fused activation
        self.taken_names = set()

    def __call__(self, model):
        if isinstance(model, keras.layers.Layer):
            self.taken_names = {layer.name for layer in keras_graph.nested_layers(model)}
            self.taken_names.add(model.name)
        return super().__call__(model)

    def changes(self, layer):
        return isinstance(layer, OUR_NORMALIZATIONS)

    def replace(self, layer):
        kind = base_class(layer, OUR_NORMALIZATIONS)
        if kind is None:
            return None
        _check_masks(layer, kind)
        if kind is GroupNorm:
            keys = configs.GROUP_KEYS
            config, activation = configs.read_our_layer(layer, keys, "GroupNormalization")
            clone = KERAS_GROUP_NORM.from_config(config)
        else:
            keys = configs.BATCH_KEYS + (configs.OUR_RENORM_KEYS if kind is BatchRenorm else ())
            config, activation = configs.read_our_layer(layer, keys, "BatchNormalization")
            if kind is BatchRenorm:
                config = _keras_renorm_config(layer, config)
            clone = KERAS_BATCH_NORM.from_config(config)
        self.activations[id(layer)] = activation
        return clone

    def layers_after(self, original, clone):
        activation = self.activations.get(id(original))
        if activation is None:
            return []
        name = f"{original.name}_{activation}"
        suffix = 0
        while name in self.taken_names:
            suffix += 1
            name = f"{original.name}_{activation}_{suffix}"
        self.taken_names.add(name)
        return [keras.layers.Activation(activation, name=name, dtype=original.dtype_policy)]

    def transfer_weights(self, original, clone):
        dropped = ("step",) if isinstance(original, BatchRenorm) else ()
        weights.transfer(original, clone, dropped=dropped)


def _keras_renorm_config(layer, config):
    for name in ("r_max", "d_max"):
        if callable(getattr(layer, name)):
            raise ValueError(
                f"Layer '{layer.name}' (BatchRenorm) has a schedule for `{name}`; "
                "keras.layers.BatchNormalization(renorm=True) clips with fixed limits only. "
                f"Set a number (e.g. the schedule's final value) before converting: "
                f"layer.{name} = ..."
            )
    if not configs.keras_renorm_supported():
        raise ValueError(
            f"Layer '{layer.name}' (BatchRenorm) has no equivalent in Keras "
            f"{keras.__version__}: keras.layers.BatchNormalization has `renorm` from Keras "
            "3.14 on."
        )
    r_max = config.pop("r_max")
    config["renorm"] = True
    config["renorm_clipping"] = {"rmax": r_max, "rmin": 1.0 / r_max, "dmax": config.pop("d_max")}
    return config


def _check_masks(layer, kind):
    if not any(mask is not None for mask in keras_graph.input_masks(layer)):
        return
    if kind is GroupNorm:
        raise ValueError(
            f"Layer '{layer.name}' (GroupNorm) receives a mask, which it honours and "
            "keras.layers.GroupNormalization ignores: the Keras model would compute "
            "something else. Remove the mask before the layer to convert it."
        )
    if layer.feature_axes != (layer.input_spec.ndim - 1,):
        raise ValueError(
            f"Layer '{layer.name}' ({kind.__name__}) receives a mask and normalizes over "
            f"axis {layer.axis}, not the last one; keras.layers.BatchNormalization applies "
            "a mask as if the features were last, so it would compute something else."
        )
