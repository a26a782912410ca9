"""TensorFlow's fused batch-norm op (`FusedBatchNormV3`) as a route of the kernels.

The router (`routing.choose_route`) sends a call here when the op can compute it (`accepts_*`)
and pays: inference in a graph run op by op, where TensorFlow's graph optimizer folds the op into
a preceding convolution, and training steps with oneDNN from `Policy.fused_min_elements` elements,
where oneDNN's kernel is one pass each way (docs/decisions/003-onednn-fused-training-threshold.md,
005-fused-inference-op.md). On a GPU the same op is cuDNN's (on paper, untested:
docs/decisions/022-gpu-route-untested.md). Gradients are TensorFlow's own.
"""

import tensorflow as tf

from kerasbn.kernels.activations import activate, activate_taped

# cuDNN's smallest epsilon: a served graph may run on a GPU.
MIN_EPSILON = 1.001e-5


def accepts_inference(x, *, feature_axes, epsilon):
    """Whether the op can normalize `x` with given statistics: float32 NHWC, epsilon at least
    `MIN_EPSILON`."""
    nhwc = x.shape.rank == 4 and tuple(feature_axes) == (3,)
    return x.dtype == tf.float32 and nhwc and epsilon >= MIN_EPSILON


def accepts_training(x, mask, *, feature_axes, epsilon):
    """Whether the op can take a training step on `x`: as `accepts_inference`, without a mask, a
    shape known while tracing with at least two elements per feature (the op returns the
    Bessel-corrected variance, undone with the count)."""
    usable = mask is None and accepts_inference(x, feature_axes=feature_axes, epsilon=epsilon)
    if not usable or not x.shape.is_fully_defined() or not x.shape[3]:
        return False
    return x.shape.num_elements() // x.shape[3] >= 2


def training_step(x, gamma, beta, *, epsilon, activation):
    """`(f(y), statistics)` of a training step by `FusedBatchNormV3`: `y = γ (x - mean) /
    sqrt(variance + ε) + β` (absent γ, β are 1, 0), and the batch's per-feature `mean`, biased
    `variance` (the op's unbiased one times (n - 1) / n) and element `count` n. Its gradient is
    TensorFlow's (`FusedBatchNormGradV3`): the formulas of `normalize.normalize_backward`."""
    channels = x.shape[3]
    count = x.shape.num_elements() // channels
    ones, zeros = tf.ones([channels], x.dtype), tf.zeros([channels], x.dtype)
    scale, offset = ones if gamma is None else gamma, zeros if beta is None else beta
    # The mean and variance given are not read in training.
    y, mean, unbiased_variance = _op(x, scale, offset, zeros, ones, epsilon, True)[:3]
    variance = unbiased_variance * ((count - 1) / count)
    count = tf.fill(tf.shape(mean), tf.constant(float(count), x.dtype))
    return activate_taped(y, activation), {"mean": mean, "variance": variance, "count": count}


def inference(x, gamma, beta, mean, variance, *, epsilon, activation):
    """`f(γ (x - mean) / sqrt(variance + ε) + β)` with the given statistics."""
    return activate(_inference(x, gamma, beta, mean, variance, epsilon), activation)


def _per_channel_sum(x):
    """`(a, b)` when the graph being traced computes the float32 NHWC `x` as `a + b` with `b` one
    value per channel (a bias: Keras' `Conv2D` adds its own as `BiasAdd`), else None."""
    if tf.executing_eagerly() or not hasattr(x, "op"):
        return None
    op, channels = x.op, x.shape[3]
    # Another reader of the sum would need it computed after all (and stop the optimizer fusing the
    # addition into the convolution); control inputs would be bypassed.
    if x.consumers() or op.control_inputs or channels is None:
        return None
    if op.type == "BiasAdd" and op.get_attr("data_format") in (b"NHWC", "NHWC"):
        pairs = [(op.inputs[0], op.inputs[1])]
    elif op.type in ("AddV2", "Add"):
        pairs = [(op.inputs[0], op.inputs[1]), (op.inputs[1], op.inputs[0])]
    else:
        return None
    per_channel_shapes = ([channels], [1, 1, 1, channels])
    for whole, bias in pairs:
        per_channel = bias.shape.rank is not None and bias.shape.as_list() in per_channel_shapes
        if per_channel and whole.shape.rank == 4 and whole.shape[3] == channels and whole.dtype == x.dtype:
            return whole, tf.reshape(bias, [channels])
    return None


def _inference(x, gamma, beta, mean, variance, epsilon):
    """`γ (x - mean) / sqrt(variance + ε) + β` by `FusedBatchNormV3`; absent γ, β are 1, 0. When
    `x` is `a + b` with a per-channel `b` (`_per_channel_sum`: a convolution's bias), the op
    normalizes `a` with the mean `mean - b`, as accurate, so that TensorFlow's graph optimizer
    folds it into the convolution producing `a` and never computes the addition. Differentiated
    later, `a`, `b`, γ and β get exact gradients (`b`'s through an offset term zero in value), the
    moving statistics none, and `x`, off the path to the output, None
    (docs/decisions/006-inference-bias-fold.md)."""
    scale = tf.ones_like(mean) if gamma is None else gamma
    offset = tf.zeros_like(mean) if beta is None else beta
    split = _per_channel_sum(x)
    if split is not None:
        x, bias = split
        mean = tf.stop_gradient(mean - bias)
        # Zero in value; its gradient is b's: k Σ dy, with dy the output's.
        bias_path = (bias - tf.stop_gradient(bias)) * scale
        offset = offset + bias_path * tf.math.rsqrt(tf.stop_gradient(variance) + epsilon)
    return _op(x, scale, offset, mean, variance, epsilon, False)[0]


def _op(x, scale, offset, mean, variance, epsilon, is_training):
    return tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=mean, variance=variance, epsilon=epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=is_training,
    )
