"""`kerasbn.convert`: a model with Keras' normalization layers replaced by ours."""

import numbers

import keras
import numpy as np

from kerasbn.conversion import configs, keras_hub_models, scope, weights
from kerasbn.conversion.fusion import fusion_pairs
from kerasbn.conversion.layer_kinds import (
    KERAS_BATCH_NORM,
    KERAS_GROUP_NORM,
    KERAS_NORMALIZATIONS,
    OUR_NORMALIZATIONS,
    base_class,
)
from kerasbn.conversion.keras_named import named_like
from kerasbn.conversion.rebuild import Rebuilder
from kerasbn.layers import BatchNorm, BatchRenorm, GroupNorm, arguments
from kerasbn.layers.group_norm import resolve_groups

_TARGETS = (None, BatchNorm, BatchRenorm, GroupNorm)
_KERAS_RENORM_STATISTICS = ("moving_stddev", "renorm_mean", "renorm_stddev")


def convert(
    model,
    *,
    batch_norm_to=None,
    r_max=None,
    d_max=None,
    renorm_momentum=None,
    groups=None,
    freeze=False,
    fuse_activations=False,
    jit_compile=True,
):
    """Returns a copy of `model` with Keras' normalization layers replaced by kerasbn's.

    Every `keras.layers.BatchNormalization` becomes a `kerasbn.BatchNorm`
    (a `kerasbn.BatchRenorm` if it has `renorm=True`) and every
    `keras.layers.GroupNormalization` a `kerasbn.GroupNorm`, with the same
    options, name, `trainable` flag and dtype policy, and the same weights, so
    the new model computes what the old one did, in training and inference.
    All other layers are copied with their weights. Nested Functional and
    Sequential models (a `keras.applications` model inside your own, say) are
    converted too. `model` itself is not modified and shares nothing with the
    result. A compiled model's compile config is carried over (with a new
    optimizer), as `keras.models.clone_model` does.

    A KerasHub backbone or task (nested ones included) keeps its class, its
    preprocessor (copied) and the rest of its API: it is rebuilt by its own
    class from its config, with the normalization layers its code creates
    made ours (subclasses named like the Keras class they replace, so saved
    files stay interchangeable; see `kerasbn.layers_in_scope`), and every
    weight carried over.

    `batch_norm_to` converts the batch norms to another layer instead:

    - `kerasbn.BatchRenorm`, for small (per replica, below ~16) or correlated
      batches. Its renorm statistics start from the trained moving ones
      (`renorm_mean = moving_mean`, `moving_stddev = renorm_stddev =
      sqrt(moving_variance + epsilon)`), so inference is unchanged. A Keras
      layer with `renorm=True` keeps its own clipping and momentum.
    - `kerasbn.GroupNorm`, for batches of 1 to 8 or train and inference
      batches of a different nature. Group norm has no moving statistics and
      normalizes each sample by its own: **the trained statistics do not carry
      over, and the converted model computes something else** until it is
      fine-tuned. `gamma` and `beta` are kept.

    Args:
      model: a Functional or Sequential `keras.Model` (nested ones included),
        or a KerasHub `Backbone` or `Task`. `TypeError` if not a Keras 3
        model (e.g. a `tf_keras` one); `ValueError` for a subclassed model,
        an unbuilt Sequential one, or a KerasHub model its class does not
        rebuild from its config.
      batch_norm_to: None, `kerasbn.BatchNorm`, `kerasbn.BatchRenorm` or
        `kerasbn.GroupNorm`, default None. What batch norms become. None: the
        equivalent layer (`BatchRenorm` for `renorm=True`, else `BatchNorm`);
        `kerasbn.BatchNorm` also turns renorm layers into plain batch norm
        (same inference). `ValueError` for anything else.
        `GroupNormalization` layers always become `GroupNorm`.
      r_max, d_max, renorm_momentum: `kerasbn.BatchRenorm`'s arguments for the
        batch norms converted to it, default None (its defaults 3.0, 5.0,
        0.99). `r_max` and `d_max` may be schedules
        (`**kerasbn.paper_renorm_clipping()`). `ValueError` if given with
        another `batch_norm_to`, or invalid for `BatchRenorm`.
      groups: int or callable, default None (32, `GroupNorm`'s default). The
        groups of each batch norm converted to `GroupNorm`: an int that
        divides every such layer's channels (-1: one group per channel), or a
        function of the channel count, e.g.
        `lambda channels: math.gcd(channels, 32)`. `ValueError` naming the
        layer and its channel count if the number does not divide it;
        `ValueError` if given with another `batch_norm_to`; `TypeError` if
        neither an int nor callable.
      freeze: bool, default False. Set `trainable=False` on every
        normalization layer of the result (the converted ones and kerasbn
        layers already there), so that fine-tuning (e.g. on small batches)
        uses and keeps the trained moving statistics.
      fuse_activations: bool, default False. Merge each normalization layer
        with the activation layer that is its only consumer into one layer
        computing both (`activation=...`), and remove the activation layer
        from the model. Fusable: `Activation` of one of the functions
        `kerasbn.BatchNorm`'s `activation` accepts (relu, relu6, leaky_relu,
        elu, gelu, silu/swish, hard_silu/hard_swish, sigmoid, hard_sigmoid,
        tanh, mish, softplus), `ReLU()` and `ReLU(6.0)`, `LeakyReLU(0.2)`,
        `ELU(1.0)`, with the normalization's dtype policy. Same outputs, one
        pass over memory less. `ValueError` for a KerasHub model (its class
        creates its activation layers).
      jit_compile: bool, default True. The `jit_compile` of the layers created
        (kerasbn layers already in the model keep theirs).

    Returns:
      A new model of the same kind (a Functional model for a subclass of
      Functional, the same class for a KerasHub model), with the same inputs,
      outputs and layer names (for a KerasHub model, the names its code sets).

    Raises:
      TypeError: `model` is not a Keras 3 model, or an argument has the wrong
        type (the message names it).
      ValueError: naming the layer, for what cannot be converted exactly: a
        subclassed model containing normalization layers, a normalization
        layer inside another layer (e.g. `TimeDistributed`), a subclass of
        Keras' layers overriding `call`, an option our layers lack, renorm
        clipping with `rmin != 1 / rmax`, ghost batch norm
        (`virtual_batch_size`, carried onto `BatchNorm`/`BatchRenorm` with
        tf_keras' moving-statistics rule) converted to `GroupNorm`.

    Example:

    ```python
    backbone = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    model = kerasbn.convert(backbone)
    ```
    """
    return _Conversion(
        batch_norm_to=batch_norm_to,
        r_max=r_max,
        d_max=d_max,
        renorm_momentum=renorm_momentum,
        groups=groups,
        freeze=freeze,
        fuse_activations=fuse_activations,
        jit_compile=jit_compile,
    )(model)


class _Conversion(Rebuilder):
    def __init__(
        self,
        *,
        batch_norm_to,
        r_max,
        d_max,
        renorm_momentum,
        groups,
        freeze,
        fuse_activations,
        jit_compile,
    ):
        super().__init__()
        if not any(batch_norm_to is target for target in _TARGETS):
            raise ValueError(
                "Argument `batch_norm_to` must be None, kerasbn.BatchNorm, kerasbn.BatchRenorm "
                f"or kerasbn.GroupNorm. Received: batch_norm_to={batch_norm_to!r}"
            )
        self.batch_norm_to = batch_norm_to
        self.renorm_options = _renorm_options(batch_norm_to, r_max, d_max, renorm_momentum)
        self.groups = _check_groups(batch_norm_to, groups)
        self.freeze = arguments.check_bool(freeze, "freeze")
        self.fuse_activations = arguments.check_bool(fuse_activations, "fuse_activations")
        self.jit_compile = arguments.check_bool(jit_compile, "jit_compile")
        self.activations = {}  # id(normalization layer) -> fused activation name
        # Batch norms converted to GroupNorm inside a KerasHub model's code, in
        # the order it creates them, and the groups planned for each (None: `groups`).
        self.created_group_norms = []
        self.planned_groups = None
        self.learning_channels = False

    # -- which layers --------------------------------------------------------

    def changes(self, layer):
        if isinstance(layer, KERAS_NORMALIZATIONS):
            return True
        return self.freeze and isinstance(layer, OUR_NORMALIZATIONS)

    def calls_to_remove(self, model):
        if not self.fuse_activations:
            return ()
        pairs = fusion_pairs(model, self._becomes_ours_without_activation)
        for normalization, _, name in pairs:
            self.activations[id(normalization)] = name
        return [activation for _, activation, _ in pairs]

    def _becomes_ours_without_activation(self, layer):
        if base_class(layer, KERAS_NORMALIZATIONS) is not None:
            return True
        ours = base_class(layer, OUR_NORMALIZATIONS)
        return ours is not None and getattr(layer, "activation", None) is None

    # -- the new layers -----------------------------------------------------

    def replace(self, layer, groups=None):
        """Our layer for `layer`, or None to copy it. `groups`: for a batch norm to GroupNorm."""
        activation = self.activations.get(id(layer))
        keras_kind = base_class(layer, KERAS_NORMALIZATIONS)
        if keras_kind is KERAS_GROUP_NORM:
            config = configs.read_keras_group_norm(layer)
            return _create(GroupNorm, config, self.jit_compile, activation)
        if keras_kind is KERAS_BATCH_NORM:
            return self._from_batch_norm(layer, activation, groups)
        ours = base_class(layer, OUR_NORMALIZATIONS)
        if ours is not None and activation is not None:
            config = dict(layer.get_config(), activation=activation)
            return type(layer).from_config(config)
        return None

    def _from_batch_norm(self, layer, activation, groups):
        config, renorm = configs.read_keras_batch_norm(layer)
        target = self.batch_norm_to or (BatchRenorm if renorm else BatchNorm)
        if target is GroupNorm:
            if "virtual_batch_size" in config:
                raise ValueError(
                    f"Layer '{layer.name}' uses ghost batch normalization "
                    f"(virtual_batch_size={config['virtual_batch_size']!r}); converting it "
                    "to GroupNorm would drop it. Convert it to BatchNorm or BatchRenorm."
                )
            group_config = {key: config[key] for key in configs.GROUP_KEYS if key in config}
            if groups is None:
                groups = self._groups_for(layer.name, int(layer.moving_mean.shape[0]))
            group_config["groups"] = groups
            return _create(GroupNorm, group_config, self.jit_compile, activation)
        if target is BatchRenorm:
            config.update(renorm or self.renorm_options)
        return _create(target, config, self.jit_compile, activation)

    def _groups_for(self, name, channels):
        groups = self.groups(channels) if callable(self.groups) else self.groups
        if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
            raise TypeError(
                f"Argument `groups` returned {groups!r} for layer '{name}' "
                f"({channels} channels); it must return an int."
            )
        try:
            resolve_groups(int(groups), channels)
        except ValueError as error:
            raise ValueError(
                f"Cannot convert layer '{name}' ({channels} channels) to "
                f"kerasbn.GroupNorm: {error}"
            ) from None
        return int(groups)  # -1 stays -1 (one group per channel), as GroupNorm keeps it

    # -- layers created by a KerasHub model's own code ------------------------

    def create(self, keras_class, args, kwargs, freeze=False):
        """The layer to create for `keras_class(*args, **kwargs)` (a scope's factory).

        Our layer for the Keras layer those arguments make, as a subclass named
        like `keras_class` (see `keras_named`), `trainable=False` if `freeze`.
        """
        keras_layer = keras_class(*args, **kwargs)
        groups = None
        to_group_norm = self.batch_norm_to is GroupNorm and not isinstance(
            keras_layer, KERAS_GROUP_NORM
        )
        if to_group_norm:
            # Unbuilt, so the channels are unknown: the planned groups; in a
            # first build (to plan them), one group per channel; else the int given.
            if self.planned_groups is not None:
                groups = self.planned_groups[len(self.created_group_norms)]
            else:
                groups = -1 if self.learning_channels else self.groups
        ours = self.replace(keras_layer, groups=groups)
        layer = named_like(type(ours), keras_class).from_config(ours.get_config())
        if to_group_norm:
            self.created_group_norms.append(layer)
        if freeze:
            layer.trainable = False
        return layer

    def build_keras_hub_model(self, model):
        if self.fuse_activations:
            raise ValueError(
                f"Argument `fuse_activations=True` cannot apply to the KerasHub model "
                f"'{model.name}' ({type(model).__name__}): it is rebuilt by its own class, "
                "which creates its activation layers. Received: fuse_activations=True"
            )
        self.planned_groups = None
        if self.batch_norm_to is GroupNorm:
            # The groups (a function of the channel count, or an int that must
            # divide it) need each layer's channels, known once it is built:
            # build once to learn them, check the groups, and build again.
            self.created_group_norms, self.learning_channels = [], True
            try:
                with scope.creating_with(self.create):
                    keras_hub_models.rebuilt(model)
            finally:
                self.learning_channels = False
            self.planned_groups = [
                self._groups_for(layer.name, _channels(layer)) for layer in self.created_group_norms
            ]
        self.created_group_norms = []
        try:
            with scope.creating_with(self.create):
                return keras_hub_models.rebuilt(model)
        finally:
            self.planned_groups = None

    # -- weights and flags --------------------------------------------------

    def transfer_weights(self, original, clone):
        if base_class(original, KERAS_NORMALIZATIONS) is not KERAS_BATCH_NORM:
            weights.transfer(original, clone)
            return
        keras_renorm = bool(getattr(original, "renorm", False))
        keras_statistics = _KERAS_RENORM_STATISTICS if keras_renorm else ()
        if isinstance(clone, GroupNorm):
            dropped = ("moving_mean", "moving_variance", *keras_statistics)
            weights.transfer(original, clone, dropped=dropped)
        elif isinstance(clone, BatchRenorm) and not keras_renorm:
            derived = _renorm_statistics(original)
            weights.transfer(original, clone, derived=derived, dropped=("step",))
        elif isinstance(clone, BatchRenorm):
            weights.transfer(original, clone, dropped=("step",))
        else:
            weights.transfer(original, clone, dropped=keras_statistics)

    def trainable(self, original, clone):
        if self.freeze and isinstance(clone, OUR_NORMALIZATIONS):
            return False
        return original.trainable


def _channels(group_norm):
    if not group_norm.built:
        raise ValueError(
            f"Layer '{group_norm.name}' of a KerasHub model is not built by the model's "
            "constructor, so its channel count is unknown and `groups` cannot be a "
            "function of it: pass an int."
        )
    return int(group_norm.input_spec.axes[group_norm.channel_axis])


def _create(cls, config, jit_compile, activation):
    config = dict(config, jit_compile=jit_compile)
    if activation is not None:
        config["activation"] = activation
    return cls.from_config(config)


def _renorm_statistics(layer):
    """Renorm statistics equivalent to a plain batch norm's moving ones."""
    mean = np.asarray(layer.moving_mean.numpy(), np.float64)
    stddev = np.sqrt(np.asarray(layer.moving_variance.numpy(), np.float64) + layer.epsilon)
    return {"moving_stddev": stddev, "renorm_mean": mean, "renorm_stddev": stddev}


def _renorm_options(batch_norm_to, r_max, d_max, renorm_momentum):
    options = {"r_max": r_max, "d_max": d_max, "renorm_momentum": renorm_momentum}
    given = {name: value for name, value in options.items() if value is not None}
    if batch_norm_to is not BatchRenorm:
        if given:
            name = sorted(given)[0]
            raise ValueError(
                f"Argument `{name}` applies only with batch_norm_to=kerasbn.BatchRenorm. "
                f"Received: {name}={given[name]!r}, batch_norm_to={batch_norm_to!r}"
            )
        return {}
    BatchRenorm(**given)  # Validates them, with BatchRenorm's own messages.
    return given


def _check_groups(batch_norm_to, groups):
    if groups is None:
        return 32
    if batch_norm_to is not GroupNorm:
        raise ValueError(
            "Argument `groups` applies only with batch_norm_to=kerasbn.GroupNorm. "
            f"Received: groups={groups!r}, batch_norm_to={batch_norm_to!r}"
        )
    if callable(groups):
        return groups
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(
            f"Argument `groups` must be an int or a function of the channel count. "
            f"Received: groups={groups!r}"
        )
    return int(groups)
