"""Converting models between Keras' normalization layers and kerasbn's.

`kerasbn.convert(model)` replaces Keras' `BatchNormalization` and
`GroupNormalization` layers by ours (optionally by batch renorm or group norm,
frozen, or fused with the activation that follows); `kerasbn.to_keras(model)`
goes back to Keras' own layers. KerasHub backbones and tasks keep their class;
`kerasbn.layers_in_scope()` builds them (`from_config`, `from_preset`) with
our layers.
"""

from kerasbn.conversion.keras_to_ours import convert
from kerasbn.conversion.layers_in_scope import layers_in_scope
from kerasbn.conversion.ours_to_keras import to_keras

__all__ = ["convert", "layers_in_scope", "to_keras"]
