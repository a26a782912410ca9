"""Population mean and variance accumulated batch by batch, exactly and stably.

Each batch contributes its count n, mean m and sum of squared deviations M2
(two-pass, in the batch's precision); batches are merged into float64 running
values with Chan et al.'s pairwise update:

    N' = N + n,   δ = m − μ,   μ' = μ + δ n / N',   M2' = M2 + M2_b + δ² N n / N'

so no E[x²] − E[x]² cancellation happens at any scale.
"""

import tensorflow as tf

from kerasbn.kernels.build import Build
from kerasbn.kernels.moments import moments


class RunningMoments:
    """Per-feature running count, mean and M2 held in float64 variables."""

    def __init__(self, feature_shape):
        self.count = tf.Variable(tf.zeros(feature_shape, tf.float64), trainable=False)
        self.mean = tf.Variable(tf.zeros(feature_shape, tf.float64), trainable=False)
        self.m2 = tf.Variable(tf.zeros(feature_shape, tf.float64), trainable=False)

    def update(self, x, feature_axes, mask=None):
        """Adds a batch `x` (features on `feature_axes`; boolean `mask` broadcastable)."""
        axes = tuple(a for a in range(x.shape.rank) if a not in feature_axes)
        x = tf.cast(x, tf.float64)
        mean, variance, count = moments(x, axes, mask, Build())
        shape = tf.shape(self.mean)
        batch_count = tf.reshape(tf.broadcast_to(count, tf.shape(mean)), shape)
        batch_mean = tf.reshape(mean, shape)
        batch_m2 = tf.reshape(variance, shape) * batch_count
        total = self.count + batch_count
        safe_total = tf.maximum(total, 1.0)
        delta = batch_mean - self.mean
        self.mean.assign(self.mean + delta * batch_count / safe_total)
        self.m2.assign(self.m2 + batch_m2 + tf.square(delta) * self.count * batch_count / safe_total)
        self.count.assign(total)

    def variance(self):
        """Biased population variance (what BatchNorm's moving variance estimates)."""
        return self.m2 / tf.maximum(self.count, 1.0)
