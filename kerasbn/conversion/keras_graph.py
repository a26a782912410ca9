"""Reading a Keras model's layer graph: the only module using Keras' private attributes.

Keras has no public API for a functional model's nodes, a layer's calls, the
mask a symbolic tensor carries, or a layer's nested layers. These attributes
are the ones `keras.models.clone_model` itself relies on; they exist unchanged
from Keras 3.10 to 3.15 (tested).
"""

import keras
from keras.src.models.functional import Functional


def is_functional(model):
    """True for a model built from a graph of layer calls (`keras.Model(inputs, outputs)`)."""
    return isinstance(model, Functional)


def is_graph_model(layer):
    """True for a Functional or Sequential model: one whose layers we can rebuild."""
    return isinstance(layer, (Functional, keras.Sequential))


def nodes(model):
    """Every call (node) in a Functional model's graph, inputs included."""
    return [node for depth_nodes in model._nodes_by_depth.values() for node in depth_nodes]


def sequential_input_layer(model):
    """The `InputLayer` a built Sequential model starts with, or None if unbuilt."""
    first = model._layers[0] if model._layers else None
    return first if isinstance(first, keras.layers.InputLayer) else None


def input_layer_of(tensor):
    """The `InputLayer` that produced a model input tensor."""
    return tensor._keras_history.operation


def input_masks(layer):
    """The mask of each of `layer`'s calls: passed as `mask=`, or carried by its input."""
    masks = []
    for node in layer._inbound_nodes:
        mask = node.arguments.kwargs.get("mask")
        if mask is None and node.input_tensors:
            mask = getattr(node.input_tensors[0], "_keras_mask", None)
        masks.append(mask)
    return masks


def nested_layers(layer):
    """All layers inside `layer` (recursively), itself excluded."""
    return list(layer._flatten_layers(include_self=False, recursive=True))


def all_layers(layer):
    """`layer` and all layers inside it, parents before their children (tracking order)."""
    return list(layer._flatten_layers(include_self=True, recursive=True))
