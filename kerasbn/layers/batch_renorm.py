"""`kerasbn.BatchRenorm`: batch renormalization (Ioffe 2017)."""

import keras
import tensorflow as tf

from kerasbn.layers import arguments
from kerasbn.layers.batch_norm import BatchNorm
from kerasbn.layers.weights import add_statistic_weight

_STATE = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


@keras.saving.register_keras_serializable(package="kerasbn")
class BatchRenorm(BatchNorm):
    """Batch renormalization: batch norm that stays right with small or non-i.i.d. batches.

    Training normalizes with the batch statistics and corrects toward the
    moving ones,

        x̂ = (x − μ_B) / σ_B · r + d,    y = γ x̂ + β,
        r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − μ) / σ, −d_max, d_max),

    with no gradient through r and d. The training output therefore depends
    less on the particular batch, and inference (which uses the moving
    statistics, exactly as `BatchNorm`) matches training better. Prefer it to
    `BatchNorm` when the per-replica batch is small (below ~16) or its samples
    are correlated (e.g. few classes per batch); above that it behaves as
    `BatchNorm` at about the same cost.

    It computes what `keras.layers.BatchNormalization(renorm=True,
    renorm_clipping={"rmax": r_max, "rmin": 1 / r_max, "dmax": d_max},
    renorm_momentum=renorm_momentum)` computes, with the same weights in the
    same order (`gamma`, `beta`, `moving_mean`, `moving_variance`,
    `moving_stddev`, `renorm_mean`, `renorm_stddev`) plus a last one, `step`:
    `ours.set_weights(keras_layer.get_weights())` migrates a trained layer
    (the step counter is then left as it is). (μ, σ) in r and d are
    `renorm_mean` and `renorm_stddev`, averaged with `renorm_momentum`; the
    inference statistics `moving_mean` and `moving_stddev` are averaged with
    `momentum`, and `moving_variance = max(moving_stddev² − ε, 0)`.

    The paper relaxes the limits during training: plain batch norm (r_max = 1,
    d_max = 0) for 5k steps, then r_max rising to 3 by step 40k and d_max to 5
    by step 25k. Pass schedules instead of numbers to get that:
    `kerasbn.BatchRenorm(**kerasbn.paper_renorm_clipping())`, or any
    `kerasbn.LinearRamp` / `keras.optimizers.schedules.LearningRateSchedule` /
    callable of the step. The layer counts its own training calls in the
    saved, non-trainable weight `step` (what the schedules receive), so the
    schedule resumes where it left off after loading a `.keras` file.

    Args:
      r_max: float >= 1, or a schedule of the step, default 3.0. Limit of the
        scale correction r. `ValueError` if a number below 1; a schedule's
        values are clamped to at least 1.
      d_max: float >= 0, or a schedule of the step, default 5.0. Limit of the
        shift correction d. `ValueError` if a negative number; a schedule's
        values are clamped to at least 0.
      renorm_momentum: float in [0, 1), default 0.99. Momentum of the
        averages (μ, σ) used for r and d. `ValueError` outside [0, 1).
      synchronized: bool, default False. As for `BatchNorm`: under a
        distribution strategy, statistics (and therefore r and d) of the global
        batch.
      virtual_batch_size: None (default) or an int >= 1, as for `BatchNorm`
        (ghost batches). r and d are then computed per ghost batch,
        r_g = clip(σ_g / σ, 1/r_max, r_max) and
        d_g = clip((μ_g − μ) / σ, −d_max, d_max) with the ghost batch's own
        statistics against the renorm averages (μ, σ), so every ghost batch is
        corrected toward the same reference; this differs from tf_keras, which
        takes one r and d from the average of the ghost statistics. All
        moving and renorm averages follow the whole batch's statistics under
        `moving_statistics`; with `synchronized=True` those are the global
        batch's, and r, d stay per ghost batch (local).
      moving_statistics: "batch" (default) or "ghost_mean", as for
        `BatchNorm`.
      Every other argument (`axis`, `momentum`, `epsilon`, `center`, `scale`,
      initializers, regularizers, constraints, `activation`, `jit_compile`) is `BatchNorm`'s,
      with the same defaults and errors. `moving_variance_initializer` also
      sets `moving_stddev` and `renorm_stddev` (to its square root).

    Call arguments, masks, edge cases and mixed precision: as `BatchNorm`. A
    feature with no usable statistics in a batch (empty, fully masked,
    non-finite) keeps all its moving statistics and gets r = 1, d = 0.

    Reference:
      Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
      Batch-Normalized Models", NeurIPS 2017, arXiv:1702.03275.
    """

    def __init__(self, *args, r_max=3.0, d_max=5.0, renorm_momentum=0.99, **kwargs):
        super().__init__(*args, **kwargs)
        self.r_max = _check_limit(r_max, "r_max", minimum=1.0)
        self.d_max = _check_limit(d_max, "d_max", minimum=0.0)
        self.renorm_momentum = arguments.check_momentum(renorm_momentum, "renorm_momentum")
        self.moving_stddev = None
        self.renorm_mean = None
        self.renorm_stddev = None
        self.step = None

    def build(self, input_shape):
        super().build(input_shape)
        shape = tuple(self.moving_mean.shape)

        def stddev_initializer(shape, dtype=None):
            return tf.sqrt(self.moving_variance_initializer(shape, dtype=dtype))

        add_statistic_weight(self, "moving_stddev", shape, stddev_initializer)
        add_statistic_weight(self, "renorm_mean", shape, self.moving_mean_initializer)
        add_statistic_weight(self, "renorm_stddev", shape, stddev_initializer)
        add_statistic_weight(self, "step", (), "zeros", dtype="int64")

    def set_weights(self, weights):
        """Sets the weights; also accepts Keras' renorm layer's list (without `step`)."""
        weights = list(weights)
        if len(weights) == len(self.weights) - 1:
            weights.append(self.step.numpy())
        super().set_weights(weights)

    def current_limits(self):
        """`(r_max, d_max)` for the current step, as float64 scalar tensors."""
        return (
            _limit_value(self.r_max, self.step.value, minimum=1.0),
            _limit_value(self.d_max, self.step.value, minimum=0.0),
        )

    def _step_parts(self):
        options = {"renorm_momentum": self.renorm_momentum}
        return _STATE, self.current_limits(), options

    def _after_step(self, new_state):
        super()._after_step(new_state)
        self.step.assign_add(tf.constant(1, self.step.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "r_max": _serialize_limit(self.r_max),
                "d_max": _serialize_limit(self.d_max),
                "renorm_momentum": self.renorm_momentum,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in ("r_max", "d_max"):
            if isinstance(config.get(name), dict):
                config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)


def _check_limit(value, name, minimum):
    """A number >= minimum (inf: no clipping), or a callable of the step (a schedule)."""
    if callable(value):
        return value
    value = arguments.check_float(value, name)
    if not value >= minimum:  # NaN included
        raise ValueError(
            f"Argument `{name}` must be >= {minimum:g} or a schedule of the step. "
            f"Received: {name}={value}"
        )
    return value


def _limit_value(limit, step, minimum):
    if callable(limit):
        value = tf.cast(limit(step), tf.float64)
        return tf.maximum(value, minimum)
    return tf.constant(limit, tf.float64)


def _serialize_limit(limit):
    if callable(limit):
        return keras.saving.serialize_keras_object(limit)
    return limit
