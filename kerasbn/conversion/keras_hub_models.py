"""KerasHub backbones and tasks: rebuilt by their own class, then paired layer by layer.

A KerasHub model (`keras_hub.models.Backbone` or `Task`) is a subclass of
Keras' Functional model whose graph is built by its class's `__init__` from
a config: rebuilding the graph layer by layer would lose the class, its
`preprocessor`, `pyramid_outputs`, `save_to_preset`. So it is rebuilt as
KerasHub rebuilds it, `cls.from_config(model.get_config())`, with the
normalization layers the caller's scope creates (`scope.creating_with`); the
same code creates the same layers in the same order, so the new model's
layers pair one to one with the old one's. keras_hub itself is never
imported: its models are recognised by their base classes' module names.
"""

import os
import tempfile

import keras

from kerasbn.conversion import keras_graph
from kerasbn.conversion.layer_kinds import KERAS_NORMALIZATIONS, OUR_NORMALIZATIONS

_BASES = {
    ("keras_hub.src.models.backbone", "Backbone"),
    ("keras_hub.src.models.task", "Task"),
}


def is_keras_hub_model(layer):
    """True for an instance of a KerasHub `Backbone` or `Task` (subclasses included)."""
    return isinstance(layer, keras.Model) and any(
        (cls.__module__, cls.__name__) in _BASES for cls in type(layer).__mro__
    )


def rebuilt(model):
    """A new model of `model`'s class from its config.

    A Backbone compiled with `compile` is compiled with the same config (a
    new optimizer); a task, whose class overrides `compile`, is compiled by
    its constructor with the class's defaults, as `keras.saving.load_model`
    and `from_preset` compile it.

    Its normalization layers are whatever the active scope creates. A task's
    preprocessor is copied (config, then assets such as vocabularies, as
    Keras' saving copies them), not shared.
    """
    config = model.get_config()
    preprocessor = _preprocessor(model)
    if preprocessor is not None:
        config["preprocessor"] = _copy_preprocessor(preprocessor)
    clone = type(model).from_config(config)
    # As Keras' loading does: a class with its own `compile` (a Task) compiled
    # itself in its constructor, with its defaults; a plain one is compiled again.
    overridden = type(model).compile is not keras.Model.compile
    if model.compiled and not overridden and model.get_compile_config() is not None:
        clone.compile_from_config(model.get_compile_config())
    return clone


def paired_layers(model, clone):
    """`(original, new)` for every layer of `model` (itself included) and its rebuilt `clone`.

    Only layers holding weights (their own or their nested layers') are
    paired: a weightless one may be shared in one model and not in the other
    (RetinaNet's label encoder and its anchor generator, say) without
    changing the model. The preprocessor's layers are left out (copied by
    `rebuilt`). Parents come before their children.

    Raises:
      ValueError: naming the model, if the two models' layers do not pair:
        different counts, a layer of another class than its counterpart
        (other than a normalization layer for another), or other weight
        shapes, i.e. the class did not rebuild the model from its config
        (a `get_config` that leaves an argument out, say).
    """
    originals, clones = _layers(model), _layers(clone)
    problem = None
    if len(originals) != len(clones):
        problem = f"{len(clones)} layers instead of {len(originals)}"
    for original, new in zip(originals, clones):
        if problem is not None:
            break
        if is_normalization(original) and is_normalization(new):
            continue
        if type(original) is not type(new):
            problem = f"a {type(new).__name__} for the layer '{original.name}' ({type(original).__name__})"
        elif _shapes(original) != _shapes(new):
            problem = (
                f"the layer '{original.name}' ({type(original).__name__}) with weights of "
                f"shapes {_shapes(new)} instead of {_shapes(original)}"
            )
    if problem is not None:
        raise ValueError(
            f"Rebuilding the KerasHub model '{model.name}' ({type(model).__name__}) from its "
            f"config gave {problem}, so its weights cannot be carried over: the class's "
            "get_config() does not describe this model completely."
        )
    return list(zip(originals, clones))


def is_normalization(layer):
    """Keras' or our batch or group normalization layer."""
    return isinstance(layer, KERAS_NORMALIZATIONS + OUR_NORMALIZATIONS)


def copy_own_weights(original, clone):
    """Copies the weights `original` holds itself (not through a nested layer) into `clone`.

    The two are a pair of `paired_layers`, so their weights match in number and shape.
    """
    for source, target in zip(_own_weights(original), _own_weights(clone), strict=True):
        target.assign(source.numpy())


def _shapes(layer):
    return [tuple(weight.shape) for weight in _own_weights(layer)]


def _own_weights(layer):
    inner = {id(w) for sub in keras_graph.nested_layers(layer) for w in sub.weights}
    return [w for w in layer.weights if id(w) not in inner]


def _preprocessor(model):
    return getattr(model, "preprocessor", None) if isinstance(model, keras.Model) else None


def _layers(model):
    preprocessor = _preprocessor(model)
    skipped = set()
    if preprocessor is not None:
        skipped = {id(layer) for layer in keras_graph.all_layers(preprocessor)}
    return [
        layer
        for layer in keras_graph.all_layers(model)
        if id(layer) not in skipped and layer.weights
    ]


def _copy_preprocessor(preprocessor):
    clone = keras.layers.deserialize(keras.layers.serialize(preprocessor))
    pairs = list(zip(keras_graph.all_layers(preprocessor), keras_graph.all_layers(clone)))
    # Assets (a tokenizer's vocabulary, say) are not in configs; Keras' saving
    # moves them through files with `save_assets` / `load_assets`, so do we.
    with tempfile.TemporaryDirectory() as directory:
        for index, (original, new) in enumerate(pairs):
            if hasattr(original, "save_assets") and hasattr(new, "load_assets"):
                path = os.path.join(directory, str(index))
                os.makedirs(path)
                original.save_assets(path)
                new.load_assets(path)
    for original, new in pairs:
        if _shapes(original) != _shapes(new):
            raise ValueError(
                f"The preprocessor '{preprocessor.name}' ({type(preprocessor).__name__}) "
                "cannot be copied from its config: its layer "
                f"'{original.name}' has weights of other shapes in the copy."
            )
        copy_own_weights(original, new)
    return clone
