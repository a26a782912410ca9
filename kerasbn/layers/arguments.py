"""Validation of constructor and call arguments shared by the layers.

Every check raises a `ValueError` or `TypeError` whose message names the
argument and the value received.
"""

import math
import numbers

import keras

from kerasbn.kernels.activations import ACTIVATIONS
from kerasbn.kernels.ghost_batch_norm import MOVING_STATISTICS


def check_axis_argument(axis):
    """`axis` must be an int or a non-empty list/tuple of distinct ints."""
    if isinstance(axis, bool):
        raise TypeError(f"Argument `axis` must be an int or a list of ints. Received: axis={axis!r}")
    if isinstance(axis, numbers.Integral):
        return int(axis)
    if isinstance(axis, (list, tuple)):
        if not axis:
            raise ValueError("Argument `axis` must not be empty. Received: axis=[]")
        for item in axis:
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                raise TypeError(
                    f"Argument `axis` must be an int or a list of ints. Received: axis={axis!r}"
                )
        return [int(item) for item in axis]
    raise TypeError(f"Argument `axis` must be an int or a list of ints. Received: axis={axis!r}")


def resolve_axes(axis, input_shape):
    """Sorted non-negative feature axes for an input of `input_shape`.

    Raises:
      ValueError: an axis is out of range, repeated, is the batch axis, or names
        a dimension whose size is unknown.
    """
    rank = len(input_shape)
    axes = [axis] if isinstance(axis, int) else list(axis)
    resolved = []
    for item in axes:
        if not -rank <= item < rank:
            raise ValueError(
                f"Argument `axis` is out of range for an input of rank {rank} "
                f"(shape {tuple(input_shape)}). Received: axis={axis}"
            )
        resolved.append(item % rank)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"Argument `axis` names the same axis twice. Received: axis={axis}")
    if 0 in resolved:
        raise ValueError(
            "Argument `axis` must not include the batch axis 0: statistics are "
            f"taken over the batch. Received: axis={axis}"
        )
    for item in resolved:
        if input_shape[item] is None:
            raise ValueError(
                f"The channel dimension (axis {item}) of the input must be known to "
                f"build the layer, but the input shape is {tuple(input_shape)}. "
                f"Received: axis={axis}"
            )
    return tuple(sorted(resolved))


def check_momentum(momentum, name="momentum"):
    """A float in [0, 1)."""
    momentum = check_float(momentum, name)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Argument `{name}` must be in [0, 1). Received: {name}={momentum}")
    return momentum


def check_epsilon(epsilon):
    """A finite float > 0."""
    epsilon = check_float(epsilon, "epsilon")
    if not 0.0 < epsilon < math.inf:
        raise ValueError(
            f"Argument `epsilon` must be a finite number > 0. Received: epsilon={epsilon}"
        )
    return epsilon


def check_float(value, name):
    """A real number (not a bool), returned as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Argument `{name}` must be a number. Received: {name}={value!r}")
    return float(value)


def check_bool(value, name):
    """A bool (Python or NumPy)."""
    if not isinstance(value, (bool,)) and type(value).__name__ != "bool_":
        raise TypeError(f"Argument `{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)


def check_mask_shape(mask_shape, input_shape, feature_axes):
    """A mask must have the input's shape without the feature axes."""
    expected = [dim for axis, dim in enumerate(input_shape) if axis not in feature_axes]
    if len(mask_shape) != len(expected):
        raise ValueError(
            f"Argument `mask` must have rank {len(expected)} (the input's rank "
            f"{len(input_shape)} minus its {len(feature_axes)} feature axis/axes). "
            f"Received: mask.shape={tuple(mask_shape)}, inputs.shape={tuple(input_shape)}"
        )
    for got, want in zip(mask_shape, expected):
        if got is not None and want is not None and got != want:
            raise ValueError(
                f"Argument `mask` must have shape {tuple(expected)} (the input's shape "
                f"without the feature axes). Received: mask.shape={tuple(mask_shape)}, "
                f"inputs.shape={tuple(input_shape)}"
            )


# Names accepted for `activation` besides the canonical ones.
_ACTIVATION_ALIASES = {"swish": "silu", "hard_swish": "hard_silu"}


def check_activation(activation):
    """The canonical name of a fusable activation, or None.

    Accepts None, "linear" (None), a name from `kernels.activations.ACTIVATIONS`
    or an alias ("swish", "hard_swish"), or the Keras activation function of
    one of those names (`keras.activations.relu`, ...).

    Raises:
      ValueError: naming `activation`, for anything else (another function, a
        name Keras has but the kernels cannot fuse, a partial with arguments).
    """
    if activation is None:
        return None
    supported = ", ".join(repr(name) for name in ACTIVATIONS)
    if isinstance(activation, str):
        name = _ACTIVATION_ALIASES.get(activation, activation)
        if name == "linear":
            return None
        if name in ACTIVATIONS:
            return name
    elif callable(activation):
        if activation is keras.activations.linear:
            return None
        for name in ACTIVATIONS:
            if activation is getattr(keras.activations, name, None):
                return name
    raise ValueError(
        f"Argument `activation` must be None, 'linear' or one of {supported} (or "
        f"'swish', 'hard_swish', or the keras.activations function of one of these "
        f"names, with its default arguments). Received: activation={activation!r}"
    )


def check_virtual_batch_size(value):
    """None, or an int >= 1 (a Python or NumPy integer, not a bool)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            "Argument `virtual_batch_size` must be None or an int >= 1 (the number of "
            f"examples per ghost batch). Received: virtual_batch_size={value!r}"
        )
    return int(value)


def check_moving_statistics(value):
    """One of `ghost_batch_norm.MOVING_STATISTICS`."""
    if not isinstance(value, str) or value not in MOVING_STATISTICS:
        choices = " or ".join(repr(choice) for choice in MOVING_STATISTICS)
        raise ValueError(
            f"Argument `moving_statistics` must be {choices}. Received: moving_statistics={value!r}"
        )
    return value
