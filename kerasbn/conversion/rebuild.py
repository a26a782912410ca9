"""Rebuilding a Functional or Sequential model with some of its layers replaced.

`Rebuilder` clones a model layer by layer (nested Functional and Sequential
models included, each rebuilt the same way) through
`keras.models.clone_model`, copies every weight into the new layers, and
restores the `trainable` flags. Subclasses say what changes: which layers are
replaced and by what (`replace`), how weights move into a replacement
(`transfer_weights`), which layer calls disappear from a graph because they
were fused into the layer before (`calls_to_remove`), and which new layers
follow a replacement (`layers_after`).

KerasHub backbones and tasks (nested ones included) are rebuilt by their own
class instead (`build_keras_hub_model`), so that they keep it; their layers
are then paired with the original's and checked to be what `replace` would
have made.
"""

import keras

from kerasbn.conversion import keras_graph, keras_hub_models, scope
from kerasbn.conversion.layer_kinds import (
    KERAS_NORMALIZATIONS,
    OUR_NORMALIZATIONS,
    base_class,
)

# Config keys a rebuilt KerasHub model's normalization layer may differ in:
# generated names differ between two builds; flags are set afterwards.
_UNCHECKED_KEYS = ("name", "trainable")


class _Removed:
    """Stands in the rebuilt graph for a layer whose call is removed (fused away)."""

    def __init__(self, layer):
        self.layer = layer


class Rebuilder:
    """Rebuilds a model; override the hooks to replace layers.

    Call the instance on a model: `new_model = rebuilder(model)`. One instance
    rebuilds one model.
    """

    def __init__(self):
        self._clones = {}  # id(original layer) -> clone
        self._originals = {}  # id(clone) -> original layer
        self._followers = {}  # id(clone) -> layers called after it
        self._removed = set()  # ids of original layers whose call is dropped
        self._leaves = []  # (original, clone) for every copied or replaced layer
        self._models = []  # (original, clone) for every rebuilt model, inner first
        self._hub_layers = []  # (original, clone) for every layer of rebuilt KerasHub models

    # -- hooks -------------------------------------------------------------

    def replace(self, layer):
        """A new, unbuilt layer to use instead of `layer`, or None to copy it."""
        return None

    def changes(self, layer):
        """Whether this rebuild would replace or alter `layer` (nested layers are checked)."""
        return False

    def transfer_weights(self, original, clone):
        """Copies `original`'s weights into `clone` (built). Default: same list."""
        clone.set_weights(original.get_weights())

    def trainable(self, original, clone):
        """The `trainable` flag of `clone`. Default: `original`'s."""
        return original.trainable

    def calls_to_remove(self, model):
        """Layers of `model`'s own graph whose call is dropped: their output is their input."""
        return ()

    def layers_after(self, original, clone):
        """New layers to call, in order, on `clone`'s output."""
        return []

    def build_keras_hub_model(self, model):
        """A new KerasHub model of `model`'s class. Default: with Keras' own layers."""
        with scope.creating_with(None):
            return keras_hub_models.rebuilt(model)

    # -- the rebuild --------------------------------------------------------

    def __call__(self, model):
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"Argument `model` must be a Keras 3 `keras.Model`. Received: model={model!r}"
            )
        if keras_hub_models.is_keras_hub_model(model):
            rebuilt = self._rebuild_keras_hub_model(model)
        elif keras_graph.is_graph_model(model):
            rebuilt = self._rebuild_model(model)
        else:
            raise _subclassed_model_error(model, inside=None)
        for original, clone in self._leaves:
            self.transfer_weights(original, clone)
        for original, clone in self._hub_layers:
            if keras_hub_models.is_normalization(original):
                self.transfer_weights(original, clone)
            else:
                keras_hub_models.copy_own_weights(original, clone)
        # Setting a model's flag sets its layers' flags: models outermost first,
        # then layers (a KerasHub model's parents before their children).
        for original, clone in reversed(self._models):
            clone.trainable = original.trainable
        for original, clone in self._hub_layers + self._leaves:
            clone.trainable = self.trainable(original, clone)
        return rebuilt

    def _rebuild_keras_hub_model(self, model):
        rebuilt = self.build_keras_hub_model(model)
        pairs = keras_hub_models.paired_layers(model, rebuilt)
        for original, clone in pairs:
            if keras_hub_models.is_normalization(original):
                self._check_keras_hub_layer(model, original, clone)
        self._hub_layers.extend(pairs)
        self._models.append((model, rebuilt))
        return rebuilt

    def _check_keras_hub_layer(self, model, original, clone):
        """`clone`, created by the KerasHub model's code, is what `replace(original)` gives."""
        expected = self.replace(original)
        if expected is None:
            expected = original
        elif self.layers_after(original, expected):
            raise ValueError(
                f"Layer '{original.name}' of the KerasHub model '{model.name}' "
                f"({type(model).__name__}) would need a new layer after it (its fused "
                "activation), but a KerasHub model is rebuilt by its own class, which "
                "creates only the layers it always creates."
            )
        wanted, made = _config(expected), _config(clone)
        if _kind(expected) is not _kind(clone) or wanted != made:
            keys = sorted(key for key in set(wanted) | set(made) if wanted.get(key) != made.get(key))
            raise ValueError(
                f"Layer '{original.name}' ({type(original).__name__}) of the KerasHub model "
                f"'{model.name}' ({type(model).__name__}) should become a "
                f"{_kind(expected).__name__} with {({k: wanted.get(k) for k in keys})}, but "
                f"the model's class creates a {_kind(clone).__name__} with "
                f"{({k: made.get(k) for k in keys})} in its place. A KerasHub model is "
                "rebuilt by its own class from its config, so every normalization layer "
                "of one kind gets the same options; converting one that already has "
                "kerasbn layers needs the options they were created with (or "
                "kerasbn.to_keras first)."
            )

    def _rebuild_model(self, model):
        self._removed.update(id(layer) for layer in self.calls_to_remove(model))
        if keras_graph.is_functional(model):
            rebuilt = keras.models.clone_model(
                model,
                input_tensors=keras.tree.map_structure(_new_input, model.input),
                clone_function=self._clone,
                call_function=self._call,
            )
        else:
            rebuilt = self._rebuild_sequential(model)
        self._models.append((model, rebuilt))
        return rebuilt

    def _rebuild_sequential(self, model):
        input_layer = keras_graph.sequential_input_layer(model)
        if input_layer is None:
            raise ValueError(
                f"The Sequential model '{model.name}' is not built, so its layers have no "
                "weights to carry over. Build it first (start it with `keras.Input(shape)`, "
                "call `model.build(input_shape)`, or call it on data)."
            )
        layers = [_new_input(input_layer.output)]
        for layer in model.layers:
            clone = self._clone(layer)
            if not isinstance(clone, _Removed):
                layers.append(clone)
                layers.extend(self._layers_after(clone))
        rebuilt = keras.Sequential(layers, name=model.name, trainable=model.trainable)
        if model.compiled:
            rebuilt.compile_from_config(model.get_compile_config())
        return rebuilt

    def _clone(self, layer):
        if id(layer) in self._clones:
            return self._clones[id(layer)]
        if id(layer) in self._removed:
            clone = _Removed(layer)
        elif keras_hub_models.is_keras_hub_model(layer):
            clone = self._rebuild_keras_hub_model(layer)
        elif keras_graph.is_graph_model(layer):
            clone = self._rebuild_model(layer)
        else:
            clone = self._clone_leaf(layer)
        self._clones[id(layer)] = clone
        self._originals[id(clone)] = layer
        return clone

    def _clone_leaf(self, layer):
        if isinstance(layer, keras.layers.Layer):
            hidden = [inner for inner in keras_graph.nested_layers(layer) if self.changes(inner)]
            if hidden and isinstance(layer, keras.Model):
                raise _subclassed_model_error(layer, inside=hidden[0])
            if hidden:
                raise ValueError(
                    f"Layer '{layer.name}' ({type(layer).__name__}) contains the layer "
                    f"'{hidden[0].name}' ({type(hidden[0]).__name__}), which cannot be "
                    "reached: only the layers of Functional and Sequential models (nested "
                    "ones included) are converted, not the layers inside other layers "
                    "(wrappers such as TimeDistributed, custom layers)."
                )
        clone = self.replace(layer)
        if clone is None:
            clone = _copy(layer)
        if isinstance(layer, keras.layers.Layer):
            self._leaves.append((layer, clone))
        return clone

    def _call(self, clone, *args, **kwargs):
        if isinstance(clone, _Removed):
            (inputs,) = args
            return inputs
        if "mask" in kwargs and kwargs["mask"] is None:
            # Recorded by Keras for layers whose `call` takes a mask; meaningless
            # (Keras reads masks off the inputs) and an error for a replacement
            # without one, e.g. keras.layers.GroupNormalization.
            del kwargs["mask"]
        outputs = clone(*args, **kwargs)
        for layer in self._layers_after(clone):
            outputs = layer(outputs)
        return outputs

    def _layers_after(self, clone):
        if id(clone) not in self._followers:
            original = self._originals[id(clone)]
            self._followers[id(clone)] = list(self.layers_after(original, clone))
        return self._followers[id(clone)]


def _kind(layer):
    """The normalization class `layer` computes: ours or Keras' (never a subclass)."""
    return base_class(layer, OUR_NORMALIZATIONS) or base_class(layer, KERAS_NORMALIZATIONS)


def _config(layer):
    return {
        key: value for key, value in layer.get_config().items() if key not in _UNCHECKED_KEYS
    }


def _copy(layer):
    """A new, unbuilt layer from `layer`'s config, as `keras.models.clone_model` makes one."""
    try:
        return layer.__class__.from_config(layer.get_config())
    except Exception as error:
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) cannot be rebuilt from its "
            f"config ({type(error).__name__}: {error}). Every layer of the model is "
            "copied this way, as keras.models.clone_model does: give the layer a "
            "get_config()/from_config() pair that round-trips (a named, registered "
            "function instead of a lambda, for instance)."
        ) from error


def _new_input(tensor):
    """A new `keras.Input` like the model input `tensor`, named after its InputLayer.

    (`clone_model` would name it after the symbolic tensor, `keras_tensor_<n>`.)
    """
    layer = keras_graph.input_layer_of(tensor)
    return keras.Input(
        batch_shape=tensor.shape,
        dtype=tensor.dtype,
        sparse=tensor.sparse,
        name=getattr(layer, "name", None),
        optional=getattr(layer, "optional", False),
    )


def _subclassed_model_error(model, inside):
    where = "" if inside is None else f" It contains the layer '{inside.name}' to convert."
    return ValueError(
        f"Model '{model.name}' ({type(model).__name__}) is a subclassed model: its layer graph "
        "is defined by Python code, so it cannot be rebuilt with other layers." + where +
        " Only Functional and Sequential models (and such models nested in them) can be "
        "converted; replace the layers in the model's own code instead."
    )
