"""Our layers under the class names of the Keras layers they replace, for KerasHub models.

Keras names each layer's weights in a saved file (`.keras`, `.weights.h5`, a
KerasHub preset's `model.weights.h5`) after its class (`.../batch_normalization_3/vars`),
not after the layer's name. A KerasHub model rebuilt with `kerasbn.BatchNorm`
layers would save them under `batch_norm_3`, and no file saved with Keras'
layers (a downloaded preset, say) could be loaded into it, nor its files into
Keras' layers. So the layers created for KerasHub models are subclasses of
ours named like the Keras class they stand for: `isinstance(layer,
kerasbn.BatchNorm)` holds, they compute what ours compute (they add nothing),
and the files stay interchangeable whenever the weights are the same.
"""

import keras

from kerasbn.conversion.layer_kinds import KERAS_NORMALIZATIONS
from kerasbn.layers import BatchNorm, BatchRenorm, GroupNorm



def _subclass(ours, keras_class):
    name = keras_class.__name__
    cls = type(
        name,
        (ours,),
        {
            "__module__": __name__,
            "__qualname__": f"{ours.__name__}As{name}",
            "__doc__": (
                f"`kerasbn.{ours.__name__}` named `{name}`, so that a KerasHub model's "
                "weight files name its weights as they name Keras' layer's. It adds nothing."
            ),
        },
    )
    return keras.saving.register_keras_serializable("kerasbn", f"{ours.__name__}As{name}")(cls)


# Created once at import: every (our class, Keras class) pair a conversion can make.
_CLASSES = {
    (ours, keras_class): _subclass(ours, keras_class)
    for ours in (BatchNorm, BatchRenorm, GroupNorm)
    for keras_class in KERAS_NORMALIZATIONS
}


def named_like(ours, keras_class):
    """The subclass of our layer class `ours` named like `keras_class`."""
    return _CLASSES[(ours, keras_class)]
