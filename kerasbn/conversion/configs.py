"""Translating layer configs between Keras' normalization layers and ours.

Every key of the source config is accounted for: carried over, translated, or
checked to be a no-op before it is dropped. A key this module does not know
(an option added by a later Keras, or by a subclass) is an error naming the
layer and the key, never silently dropped: a conversion that loses an option
changes the model without telling anyone (timm #1254: PyTorch's
`convert_sync_batchnorm` dropped the activation of `BatchNormAct2d`).
"""

import inspect
import math

import keras

BASE_KEYS = ("name", "trainable", "dtype", "activity_regularizer")
AFFINE_KEYS = (
    "center",
    "scale",
    "beta_initializer",
    "gamma_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
)
BATCH_KEYS = (
    *BASE_KEYS,
    "axis",
    "momentum",
    "epsilon",
    *AFFINE_KEYS,
    "moving_mean_initializer",
    "moving_variance_initializer",
    "synchronized",
)
GROUP_KEYS = (*BASE_KEYS, "groups", "axis", "epsilon", *AFFINE_KEYS)
KERAS_RENORM_KEYS = ("renorm", "renorm_clipping", "renorm_momentum")
OUR_RENORM_KEYS = ("r_max", "d_max", "renorm_momentum")
OUR_KEYS = ("jit_compile", "activation")
# tf_keras' ghost batch norm option, carried onto ours with tf_keras' rule for
# the moving statistics (the mean of the ghost batches' statistics).
GHOST_KEYS = ("virtual_batch_size",)

# Options of tf_keras' BatchNormalization that Keras 3 dropped; a layer (a
# compatibility subclass, say) may still carry them. None is their no-op value.
_LEGACY_NO_OPS = {"fused": None, "virtual_batch_size": None, "adjustment": None}
# Our options whose default leaves a Keras layer's behaviour unchanged.
_OUR_NO_OPS = {"moving_statistics": "batch"}


def keras_renorm_supported():
    """Whether this Keras' BatchNormalization has `renorm` (Keras >= 3.14)."""
    from kerasbn.conversion.layer_kinds import KERAS_BATCH_NORM

    return "renorm" in inspect.signature(KERAS_BATCH_NORM.__init__).parameters


def read_keras_batch_norm(layer):
    """Reads a `keras.layers.BatchNormalization`'s config.

    Returns:
      `(config, renorm)`: `config` holds the keys `kerasbn.BatchNorm` shares
      with it (`BATCH_KEYS`), plus, for a tf_keras-style layer with
      `virtual_batch_size` set, `virtual_batch_size` and
      `moving_statistics="ghost_mean"` (tf_keras' rule, so that the converted
      model trains as the original did); `renorm` is None for a plain layer,
      else a dict of `BatchRenorm` arguments `r_max`, `d_max`,
      `renorm_momentum`.

    Raises:
      ValueError: naming the layer, for an unknown option, a tf_keras option
        set to anything but its no-op value (`adjustment`, `fused`), or renorm
        clipping that `BatchRenorm` cannot express (`rmin` other than
        `1 / rmax`).
    """
    config = _check_keys(layer, BATCH_KEYS + KERAS_RENORM_KEYS + GHOST_KEYS, "BatchNorm")
    renorm = None
    if config.get("renorm"):
        renorm = dict(_renorm_limits(layer, config.get("renorm_clipping") or {}))
        renorm["renorm_momentum"] = config.get("renorm_momentum", 0.99)
    selected = _select(config, BATCH_KEYS)
    if config.get("virtual_batch_size") is not None:
        selected["virtual_batch_size"] = config["virtual_batch_size"]
        selected["moving_statistics"] = "ghost_mean"
    return selected, renorm


def read_keras_group_norm(layer):
    """Reads a `keras.layers.GroupNormalization`'s config: the `GROUP_KEYS`.

    Raises:
      ValueError: naming the layer, for an option `kerasbn.GroupNorm` lacks.
    """
    return _select(_check_keys(layer, GROUP_KEYS, "GroupNorm"), GROUP_KEYS)


def read_our_layer(layer, keys, target):
    """Reads one of our layers' configs for Keras' `target` layer.

    Returns:
      `(config, activation)`: the `keys` of the config, `axis` made an int,
      and the fused activation's name (None if none).

    Raises:
      ValueError: naming the layer, for an option Keras' layer lacks, or an
        `axis` that is a list of several axes (Keras' layers take one).
    """
    config = _check_keys(layer, keys + OUR_KEYS, target)
    axis = config.get("axis")
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) normalizes over several "
                f"feature axes (axis={axis}); keras.layers.{target} takes a single axis."
            )
        (config["axis"],) = axis
    return _select(config, keys), config.get("activation")


def _check_keys(layer, known, target):
    config = layer.get_config()
    for key, value in config.items():
        if key in known:
            continue
        no_ops = {**_LEGACY_NO_OPS, **_OUR_NO_OPS}
        if key in no_ops and value == no_ops[key]:
            continue
        if key == "virtual_batch_size":
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) uses ghost batch "
                f"normalization (virtual_batch_size={value!r}), which {target} does not "
                "have. Remove the option or keep the layer as it is."
            )
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) has the option "
            f"`{key}`={value!r}, which {target} does not have; converting it would "
            "silently drop that option."
        )
    return config


def _select(config, keys):
    return {key: config[key] for key in keys if key in config}


def _renorm_limits(layer, clipping):
    """Keras' `renorm_clipping` as `BatchRenorm`'s symmetric `r_max`, `d_max`."""
    r_max = _number(clipping.get("rmax"), math.inf)
    r_min = _number(clipping.get("rmin"), 0.0)
    d_max = _number(clipping.get("dmax"), math.inf)
    symmetric = r_max >= 1.0 and (
        math.isclose(r_min, 1.0 / r_max, rel_tol=1e-6) if r_min else math.isinf(r_max)
    )
    if not symmetric:
        raise ValueError(
            f"Layer '{layer.name}' (BatchNormalization) clips r to [{r_min}, {r_max}] "
            f"(renorm_clipping={clipping}); kerasbn.BatchRenorm clips it to "
            "[1/r_max, r_max], so it can convert only rmin = 1/rmax (a missing rmax and "
            "rmin mean no clipping)."
        )
    return {"r_max": r_max, "d_max": d_max}


def _number(value, default):
    return default if value is None else float(value)
