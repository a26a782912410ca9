"""Which layers a conversion reads: Keras' normalization layers and ours."""

import keras

from kerasbn.layers import BatchNorm, BatchRenorm, GroupNorm

# Keras' classes, taken at import: inside `kerasbn.layers_in_scope` the names
# in `keras.layers` are proxies (`scope.py`), which `is` does not match.
KERAS_BATCH_NORM = keras.layers.BatchNormalization
KERAS_GROUP_NORM = keras.layers.GroupNormalization
KERAS_NORMALIZATIONS = (KERAS_BATCH_NORM, KERAS_GROUP_NORM)
# BatchRenorm subclasses BatchNorm: it comes first so that it matches as itself.
OUR_NORMALIZATIONS = (BatchRenorm, BatchNorm, GroupNorm)


def base_class(layer, bases):
    """The class of `bases` that `layer` is an instance of, or None.

    A subclass counts only if it keeps its base's `build` and `call`, so it
    computes what the base computes (its config is still checked key by key).

    Raises:
      ValueError: naming the layer, if it subclasses one of `bases` and
        overrides `build` or `call`: what it computes is unknown.
    """
    for base in bases:
        if isinstance(layer, base):
            kind = type(layer)
            if kind.call is not base.call or kind.build is not base.build:
                raise ValueError(
                    f"Layer '{layer.name}' ({kind.__name__}) subclasses {base.__name__} "
                    "and overrides `call` or `build`, so what it computes is unknown and "
                    "it cannot be converted. Convert its base class's layers only, or "
                    "replace it in the model's own code."
                )
            return base
    return None
