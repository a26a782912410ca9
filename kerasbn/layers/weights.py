"""Creating the layers' weights, and the arguments and config behind them.

The learned scale `gamma` and offset `beta` every normalization layer shares
follow Keras' normalization layers: `center`/`scale` switch `beta`/`gamma` on,
each with an initializer, a regularizer and a constraint. Statistics (moving
averages, counters) are non-trainable weights. All weights keep their own dtype
(`autocast=False`): float32 under mixed precision.
"""

from keras import constraints, initializers, regularizers

from kerasbn.layers import arguments

_ROLES = ("beta", "gamma")
_KINDS = {
    "initializer": (initializers.get, initializers.serialize),
    "regularizer": (regularizers.get, regularizers.serialize),
    "constraint": (constraints.get, constraints.serialize),
}


def set_affine_arguments(layer, *, center, scale, **options):
    """Validates and stores `center`, `scale` and the six `{beta,gamma}_{kind}` options."""
    layer.center = arguments.check_bool(center, "center")
    layer.scale = arguments.check_bool(scale, "scale")
    for role in _ROLES:
        for kind, (get, _) in _KINDS.items():
            name = f"{role}_{kind}"
            setattr(layer, name, get(options.pop(name)))
    if options:
        raise TypeError(f"Unexpected affine arguments: {sorted(options)}")
    layer.gamma = None
    layer.beta = None


def add_affine_weights(layer, shape):
    """Creates `layer.gamma` (if `scale`) then `layer.beta` (if `center`), Keras' order."""
    for role, enabled in (("gamma", layer.scale), ("beta", layer.center)):
        if enabled:
            weight = layer.add_weight(
                shape=shape,
                name=role,
                initializer=getattr(layer, f"{role}_initializer"),
                regularizer=getattr(layer, f"{role}_regularizer"),
                constraint=getattr(layer, f"{role}_constraint"),
                trainable=True,
                autocast=False,
            )
            setattr(layer, role, weight)


def affine_config(layer):
    """The serialized affine arguments, for `get_config()`."""
    config = {"center": layer.center, "scale": layer.scale}
    for role in _ROLES:
        for kind, (_, serialize) in _KINDS.items():
            name = f"{role}_{kind}"
            config[name] = serialize(getattr(layer, name))
    return config


def add_statistic_weight(layer, name, shape, initializer, dtype=None):
    """A non-trainable weight holding a statistic, set as `layer.<name>`."""
    weight = layer.add_weight(
        shape=shape,
        name=name,
        initializer=initializer,
        dtype=dtype,
        trainable=False,
        autocast=False,
    )
    setattr(layer, name, weight)
    return weight
