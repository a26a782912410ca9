"""Finding the normalization layers whose only consumer is a fusable activation layer."""

import collections

from kerasbn.conversion import keras_graph
from kerasbn.conversion.activations import fusable_activation


def fusion_pairs(model, can_fuse):
    """The (normalization, activation layer, activation name) triples to fuse in `model`.

    A pair fuses when, in this model's own graph (nested models are searched
    separately): `can_fuse(layer)` holds for the normalization layer and each
    layer is called exactly once; the normalization's output goes only to the
    activation layer (not to another layer, nor out of the model); the
    activation layer is one `fusable_activation` recognises; and both have the
    same dtype policy (an activation with its own policy, e.g. a float32 output
    layer in a mixed_float16 model, would compute in another dtype).

    Args:
      model: a Functional or Sequential model.
      can_fuse: callable, `layer -> bool`, the normalization layers to consider.

    Returns:
      A list of `(normalization, activation_layer, name)`.
    """
    if keras_graph.is_functional(model):
        candidates = _functional_candidates(model)
    else:
        candidates = _sequential_candidates(model)
    pairs = []
    for normalization, activation in candidates:
        if not can_fuse(normalization):
            continue
        name = fusable_activation(activation)
        if name is None:
            continue
        if normalization.dtype_policy.name != activation.dtype_policy.name:
            continue
        pairs.append((normalization, activation, name))
    return pairs


def _functional_candidates(model):
    graph = [node for node in keras_graph.nodes(model) if node.operation is not None]
    calls = collections.Counter(id(node.operation) for node in graph)
    consumers = collections.defaultdict(list)
    for node in graph:
        for tensor in node.input_tensors:
            consumers[id(tensor)].append(node)
    outputs = {id(tensor) for tensor in model.outputs}
    candidates = []
    for node in graph:
        if node.is_input or calls[id(node.operation)] != 1 or len(node.outputs) != 1:
            continue
        (output,) = node.outputs
        following = consumers[id(output)]
        if id(output) in outputs or len(following) != 1:
            continue
        (next_node,) = following
        if calls[id(next_node.operation)] != 1 or len(next_node.input_tensors) != 1:
            continue
        candidates.append((node.operation, next_node.operation))
    return candidates


def _sequential_candidates(model):
    layers = model.layers
    calls = collections.Counter(id(layer) for layer in layers)
    return [
        (layer, following)
        for layer, following in zip(layers, layers[1:])
        if calls[id(layer)] == 1 and calls[id(following)] == 1
    ]
