"""Step schedules for BatchRenorm's clipping limits.

Ioffe (2017) trains the first steps as plain batch norm (r_max = 1, d_max = 0)
and then relaxes the limits gradually. `LinearRamp` expresses that, and
`paper_renorm_clipping()` gives the paper's exact schedule, so no callback is
needed: `kerasbn.BatchRenorm(**kerasbn.paper_renorm_clipping())`.
"""

import numbers

import keras
import tensorflow as tf

from kerasbn.layers import arguments


@keras.saving.register_keras_serializable(package="kerasbn")
class LinearRamp(keras.optimizers.schedules.LearningRateSchedule):
    """A value held at `initial_value` until `start_step`, then linear to `final_value`.

    `value(step) = initial_value` for `step <= start_step`, `final_value` for
    `step >= end_step`, linear in between. A `LearningRateSchedule`, so it
    serializes with the layer and can be used anywhere Keras takes one.

    Args:
      initial_value: float, the value up to `start_step`.
      final_value: float, the value from `end_step` on.
      start_step: int >= 0, default 0. `ValueError` if negative.
      end_step: int >= start_step. `ValueError` if smaller than `start_step`.
    """

    def __init__(self, initial_value, final_value, start_step=0, end_step=0):
        self.initial_value = arguments.check_float(initial_value, "initial_value")
        self.final_value = arguments.check_float(final_value, "final_value")
        self.start_step = _check_step(start_step, "start_step")
        self.end_step = _check_step(end_step, "end_step")
        if self.end_step < self.start_step:
            raise ValueError(
                "Argument `end_step` must be >= `start_step`. Received: "
                f"start_step={self.start_step}, end_step={self.end_step}"
            )

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        span = float(max(self.end_step - self.start_step, 1))
        progress = tf.clip_by_value((step - self.start_step) / span, 0.0, 1.0)
        if self.end_step == self.start_step:
            progress = tf.cast(step >= self.start_step, tf.float32)
        return self.initial_value + (self.final_value - self.initial_value) * progress

    def get_config(self):
        return {
            "initial_value": self.initial_value,
            "final_value": self.final_value,
            "start_step": self.start_step,
            "end_step": self.end_step,
        }


def paper_renorm_clipping(
    warmup_steps=5000, r_max=3.0, r_max_step=40000, d_max=5.0, d_max_step=25000
):
    """Ioffe (2017)'s schedule as `BatchRenorm` keyword arguments.

    Plain batch norm (r_max = 1, d_max = 0) for `warmup_steps` training steps,
    then r_max rises linearly to `r_max` at step `r_max_step` and d_max to
    `d_max` at step `d_max_step`. The defaults are the paper's (its Inception
    experiments): 5k, 3 by 40k, 5 by 25k. Scale the steps to your run length.

    Returns:
      `{"r_max": LinearRamp(...), "d_max": LinearRamp(...)}`.
    """
    return {
        "r_max": LinearRamp(1.0, r_max, warmup_steps, r_max_step),
        "d_max": LinearRamp(0.0, d_max, warmup_steps, d_max_step),
    }


def _check_step(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Argument `{name}` must be an int. Received: {name}={value!r}")
    if value < 0:
        raise ValueError(f"Argument `{name}` must be >= 0. Received: {name}={value}")
    return int(value)
