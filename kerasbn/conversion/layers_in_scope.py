"""`kerasbn.layers_in_scope`: build models whose code creates Keras' normalization layers with ours."""

import numbers
import threading

from kerasbn.conversion import scope
from kerasbn.conversion.keras_to_ours import _Conversion


class layers_in_scope:  # noqa: N801 (a context manager class named like `keras.name_scope`)
    """Within the `with` block, Keras' normalization layers are created as kerasbn's.

    In the block, in this thread only, `keras.layers.BatchNormalization(...)`
    creates a `kerasbn.BatchNorm` (a `kerasbn.BatchRenorm` for
    `renorm=True`) and `keras.layers.GroupNormalization(...)` a
    `kerasbn.GroupNorm`, with the same options, as `kerasbn.convert` would
    convert them. That is how KerasHub models create their layers, so a
    KerasHub model built, deserialized or loaded in the block (`from_config`,
    `from_preset`, `keras.saving.load_model` of a `.keras` file holding one)
    has our layers, with weights loaded from files saved with Keras' layers
    or ours alike:

    ```python
    with kerasbn.layers_in_scope():
        backbone = keras_hub.models.ResNetBackbone.from_preset("resnet_50_imagenet")
    ```

    The layers created are subclasses of ours named like the Keras class
    they stand for (`type(layer).__name__ == "BatchNormalization"`,
    `isinstance(layer, kerasbn.BatchNorm)`): Keras names a layer's weights
    in saved files after its class, so the files stay interchangeable.

    Only calls of those two names of `keras.layers` change: layers that a
    config names by class (the layers of a Functional or Sequential model
    being deserialized) stay Keras' (use `kerasbn.convert` for those), and a
    subclass of Keras' layers is left alone. Other threads are unaffected; on
    exit, normal or by an exception, `keras.layers` is as it was once no
    thread is in a scope. Scopes nest: the innermost one applies.

    Args:
      batch_norm_to: None, `kerasbn.BatchNorm`, `kerasbn.BatchRenorm` or
        `kerasbn.GroupNorm`, default None: what batch norms become, as in
        `kerasbn.convert`. `ValueError` for anything else.
      r_max, d_max, renorm_momentum: default None; `BatchRenorm`'s arguments,
        as in `kerasbn.convert`. `ValueError` without
        `batch_norm_to=kerasbn.BatchRenorm`, or if invalid.
      groups: int, default None (32): the groups of batch norms converted to
        `GroupNorm`. It must divide every such layer's channels (the layer's
        build raises `ValueError` otherwise); a function of the channel
        count is a `TypeError` here (a layer being created does not know its
        channels yet; `kerasbn.convert` takes one). `ValueError` without
        `batch_norm_to=kerasbn.GroupNorm`.
      freeze: bool, default False. `trainable=False` on every layer created.
        `TypeError` if not a bool.
      jit_compile: bool, default True. The `jit_compile` of the layers
        created. `TypeError` if not a bool.

    Raises:
      ValueError, TypeError: when called, for the arguments above.
    """

    def __init__(
        self,
        *,
        batch_norm_to=None,
        r_max=None,
        d_max=None,
        renorm_momentum=None,
        groups=None,
        freeze=False,
        jit_compile=True,
    ):
        if groups is not None and (
            isinstance(groups, bool) or not isinstance(groups, numbers.Integral)
        ):
            raise TypeError(
                "Argument `groups` of layers_in_scope must be an int: a layer being "
                "created does not know its channels yet (kerasbn.convert takes a "
                f"function of the channel count). Received: groups={groups!r}"
            )
        self._conversion = _Conversion(
            batch_norm_to=batch_norm_to,
            r_max=r_max,
            d_max=d_max,
            renorm_momentum=renorm_momentum,
            groups=groups,
            freeze=freeze,
            fuse_activations=False,
            jit_compile=jit_compile,
        )
        # Each thread entering this scope keeps its own exits to run.
        self._entered = threading.local()

    def _create(self, keras_class, args, kwargs):
        return self._conversion.create(keras_class, args, kwargs, freeze=self._conversion.freeze)

    def __enter__(self):
        context = scope.creating_with(self._create)
        context.__enter__()
        if not hasattr(self._entered, "contexts"):
            self._entered.contexts = []
        self._entered.contexts.append(context)
        return self

    def __exit__(self, *exception):
        return self._entered.contexts.pop().__exit__(*exception)
