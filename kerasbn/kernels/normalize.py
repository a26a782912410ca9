"""Normalisation with batch statistics and its hand-derived gradient.

Forward, per feature:   x̂ = (x - μ_B) / sqrt(σ²_B + ε),   y = γ (r x̂ + d) + β
where (r, d) are Ioffe's batch-renormalisation corrections (constants for the
gradient: no gradient flows through them) and r = 1, d = 0 for plain batch norm.

Backward, with N elements per feature, S1 = Σ dy and S2 = Σ dy x̂ (one pass over
dy and x):
    dβ = S1
    dγ = r S2 + d S1
    dx = γ r / sqrt(σ²_B + ε) · (dy - S1/N - x̂ S2/N)
With a mask w (1 where a position counts), the statistics only see unmasked
positions, so the two mean terms are taken over them and only they receive them:
    dx = γ r / sqrt(σ²_B + ε) · (dy - w (S1w/N + x̂ S2w/N)),  S·w = Σ w (·)
while dβ and dγ still sum over every position (every output depends on β, γ).

A feature with no element (empty or fully masked batch) has its inverse standard
deviation set to 0: x̂ = 0, y = β and dx = 0 there instead of NaN.
"""

import tensorflow as tf


def normalize_with_batch_statistics(
    x, gamma, beta, mean, variance, count, *, epsilon, axes, mask=None, r=None, d=None
):
    """Returns `γ (r x̂ + d) + β` with a custom gradient.

    Args:
      x: float tensor.
      gamma, beta: per-feature tensors already shaped to broadcast against `x`.
      mean, variance, count: outputs of `moments(stop_gradient(x), axes, mask)`.
      epsilon: Python float added to the variance.
      axes: tuple of reduced axes.
      mask: optional boolean tensor broadcastable to `x`.
      r, d: optional broadcastable renormalisation corrections (treated as
        constants).

    Returns:
      The normalised tensor, same shape and dtype as `x`.
    """
    has_elements = count > 0
    inv_std = tf.where(
        has_elements, tf.math.rsqrt(variance + epsilon), tf.zeros_like(variance)
    )
    divisor = tf.maximum(count, 1.0)
    if r is not None:
        r = tf.stop_gradient(r)
        d = tf.stop_gradient(d)

    def sum_over(values):
        return tf.reduce_sum(values, axis=axes, keepdims=True)

    @tf.custom_gradient
    def forward(x, gamma, beta):
        x_hat = (x - mean) * inv_std
        corrected = x_hat if r is None else x_hat * r + d
        y = corrected * gamma + beta

        def grad(dy):
            x_hat = (x - mean) * inv_std
            sum_dy = sum_over(dy)
            sum_dy_xhat = sum_over(dy * x_hat)
            if mask is None:
                mean_dy = sum_dy / divisor
                mean_dy_xhat = sum_dy_xhat / divisor
                centred = dy - mean_dy - x_hat * mean_dy_xhat
            else:
                zeros = tf.zeros_like(dy)
                masked_dy = tf.where(mask, dy, zeros)
                mean_dy = sum_over(masked_dy) / divisor
                mean_dy_xhat = sum_over(masked_dy * x_hat) / divisor
                centred = dy - tf.where(mask, mean_dy + x_hat * mean_dy_xhat, zeros)
            scale = gamma * inv_std if r is None else gamma * r * inv_std
            dx = scale * centred
            dgamma = sum_dy_xhat if r is None else r * sum_dy_xhat + d * sum_dy
            return dx, dgamma, sum_dy

        return y, grad

    return forward(x, gamma, beta)
