"""Moving weights between a normalization layer and its replacement, by weight name.

Every weight of the new layer is set, and every weight of the old one is
either used or listed as deliberately dropped, so a weight can never be lost
without a decision.
"""

import numpy as np


def transfer(original, clone, derived=None, dropped=()):
    """Sets `clone`'s weights from `original`'s, matching them by name.

    Args:
      original: the built source layer.
      clone: the built new layer.
      derived: dict, default None. Weights of `clone` computed instead of
        copied: name -> NumPy value.
      dropped: names of `original`'s weights with no counterpart in `clone`
        (e.g. moving statistics when converting to group normalization), and
        of `clone`'s weights left at their initial value (e.g. a step counter).

    Raises:
      ValueError: a weight of either layer has no counterpart and is not in
        `dropped` (a bug in the conversion, never silently ignored).
    """
    derived = dict(derived or {})
    source = {_name(weight): weight for weight in original.weights}
    values = []
    for weight in clone.weights:
        name = _name(weight)
        if name in derived:
            value = derived.pop(name)
        elif name in source:
            value = source.pop(name).numpy()
        elif name in dropped:
            value = weight.numpy()
        else:
            raise ValueError(
                f"No value for weight '{name}' of layer '{clone.name}' "
                f"({type(clone).__name__}) from layer '{original.name}'."
            )
        values.append(np.asarray(value, dtype=weight.dtype))
    unused = sorted(set(source) - set(dropped))
    if unused or derived:
        raise ValueError(
            f"Weights {unused + sorted(derived)} of layer '{original.name}' "
            f"({type(original).__name__}) have no place in '{clone.name}' ({type(clone).__name__})."
        )
    clone.set_weights(values)


def _name(weight):
    # Keras 3 variables are named by the layer's `add_weight(name=...)`; `path`
    # adds the layer's name in front.
    return weight.name
