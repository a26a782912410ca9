"""Which normalization layers feed which: levels for recalibration passes.

A layer's exact population statistics depend on every normalization layer
upstream of it, so those must be recalibrated first. Layers at the same level
(no path between them) are recalibrated together in one pass over the data.
The levels are found by tracing the model once and walking the TensorFlow graph
backwards from each layer's input to the outputs of other normalization layers;
this works for Sequential, functional, nested and subclassed models alike.
"""


def upstream_layers(input_tensors, outputs_by_layer):
    """Normalization layers whose outputs `input_tensors` (graph tensors) depend on."""
    producer_of = {}
    for layer, tensors in outputs_by_layer.items():
        for tensor in tensors:
            producer_of[tensor.ref()] = layer
    found = set()
    seen = set()
    stack = list(input_tensors)
    while stack:
        tensor = stack.pop()
        if tensor.ref() in seen:
            continue
        seen.add(tensor.ref())
        layer = producer_of.get(tensor.ref())
        if layer is not None:
            found.add(layer)
            continue  # what lies above it is that layer's own dependency
        stack.extend(tensor.op.inputs)
    return found


def levels(layers, inputs_by_layer, outputs_by_layer):
    """Level of each layer: 0 without normalization upstream, else 1 + max upstream."""
    upstream = {
        layer: upstream_layers(inputs_by_layer[layer], outputs_by_layer) - {layer}
        for layer in layers
    }
    level = {}

    def resolve(layer, visiting=()):
        if layer not in level:
            if layer in visiting:
                raise ValueError(f"Layer {layer.name!r} depends on itself.")
            parents = upstream[layer]
            level[layer] = 1 + max((resolve(p, visiting + (layer,)) for p in parents), default=-1)
        return level[layer]

    for layer in layers:
        resolve(layer)
    return level
