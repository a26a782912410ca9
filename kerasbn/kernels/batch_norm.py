"""Batch normalisation kernels: the training step and inference."""

import tensorflow as tf

from kerasbn.kernels import tf_internals
from kerasbn.kernels.activations import activate
from kerasbn.kernels.axes import broadcast_shape, mask_to_broadcast, reduction_axes, to_broadcast
from kerasbn.kernels.compile import (
    built_for_xla,
    built_untaped,
    kernel,
    statistics_are_differentiable,
)
from kerasbn.kernels.moments import moments
from kerasbn.kernels.normalize import normalize_with_batch_statistics


def moving_average(moving, batch, momentum, valid):
    """Keras' rule `moving * momentum + batch * (1 - momentum)` where `valid`.

    Where `valid` is False (no element in the batch, or a non-finite batch
    statistic) the moving value is kept, so one bad batch cannot poison it.
    """
    updated = moving * momentum + batch * (1.0 - momentum)
    return tf.where(valid, updated, moving)


def statistics_are_usable(mean, variance, count):
    """Per feature: the batch had elements and its statistics are finite."""
    finite = tf.logical_and(tf.math.is_finite(mean), tf.math.is_finite(variance))
    return tf.logical_and(finite, count > 0)


def batch_moments(x, feature_axes, mask=None):
    """Moments of a batch for `feature_axes`, with the mask made broadcastable.

    Returns `(mean, variance, count, axes, mask)`; `mask` is None or a boolean
    tensor broadcastable to `x`. Statistics carry no gradient (see `moments`):
    the custom gradient of `normalize_with_batch_statistics` accounts for them.
    """
    rank = x.shape.rank
    axes = reduction_axes(rank, feature_axes)
    if mask is not None:
        mask = mask_to_broadcast(mask, rank, feature_axes)
    mean, variance, count = moments(x, axes, mask)
    return mean, variance, count, axes, mask


def affine_parameters(x, gamma, beta, feature_axes, feature_shape):
    """gamma and beta shaped to broadcast; ones and zeros when absent.

    `feature_shape` (a shape tensor or list) gives the shape of the stand-ins.
    """
    rank = x.shape.rank
    shape = broadcast_shape(rank, feature_axes, feature_shape)
    gamma = tf.ones(shape, x.dtype) if gamma is None else to_broadcast(gamma, rank, feature_axes)
    beta = tf.zeros(shape, x.dtype) if beta is None else to_broadcast(beta, rank, feature_axes)
    return gamma, beta


def _fused_training_input(x, feature_axes, epsilon, mask):
    """Whether TensorFlow's `FusedBatchNormV3` can take this training call.

    Float32 NHWC inputs without a mask, of a shape known while tracing with at
    least two elements per feature (the op returns the Bessel-corrected
    variance, undone with the count), epsilon at least cuDNN's minimum.
    """
    if mask is not None or epsilon < _FUSED_MIN_EPSILON:
        return False
    if not (x.dtype == tf.float32 and x.shape.rank == 4 and tuple(feature_axes) == (3,)):
        return False
    if not x.shape.is_fully_defined() or not x.shape[3]:
        return False
    return x.shape.num_elements() // x.shape[3] >= 2


def _onednn_fused_training(x, feature_axes, epsilon, mask):
    """With oneDNN on, whether a training call on `x` is worth its fused op:
    an input `_fused_training_input` accepts, of at least
    `_FUSED_TRAINING_MIN_ELEMENTS` elements."""
    return (
        tf_internals.onednn_enabled() is True
        and _fused_training_input(x, feature_axes, epsilon, mask)
        and x.shape.num_elements() >= _FUSED_TRAINING_MIN_ELEMENTS
    )


def _inline_under_onednn(
    x, gamma, beta, moving_mean, moving_variance, mask=None, *, epsilon, feature_axes, **_
):
    """`Kernel`'s `inline_when`: with oneDNN on, every input that trains with
    the fused op (`_onednn_fused_training`), whatever the XLA policy's
    `min_elements` or the layer's `jit_compile`. Smaller inputs follow the
    policy, as with oneDNN off.

    oneDNN's batch-norm kernel beat our XLA programs in whole models too
    (2-core AVX-512 EPYC, Keras ÷ ours, interleaved, inputs from 2^20 elements
    on the XLA programs / inline: MobileNetV2 1.26 / 1.46, EfficientNetB0
    1.16 / 1.18); with oneDNN off the XLA programs stay (MobileNetV2 1.19 /
    1.02, EfficientNetB0 1.29 / 1.06).
    """
    del gamma, beta, moving_mean, moving_variance  # `batch_norm_train`'s signature
    return _onednn_fused_training(x, feature_axes, epsilon, mask)


@kernel(inline_when=_inline_under_onednn)
def batch_norm_train(
    x,
    gamma,
    beta,
    moving_mean,
    moving_variance,
    mask=None,
    *,
    momentum,
    epsilon,
    feature_axes,
    activation=None,
):
    """One training step of batch normalisation.

    Args:
      x: float tensor of rank 2 to 5 (float32 or float64).
      gamma, beta: per-feature tensors (shape of `x` on `feature_axes`), or None
        for no scale / no offset.
      moving_mean, moving_variance: per-feature moving statistics.
      mask: optional boolean tensor of `x`'s shape without the feature axes.
      momentum, epsilon: Python floats.
      feature_axes: sorted tuple of non-negative feature axes.
      activation: None, or the name of a fused activation applied to the
        normalized output (`activations.ACTIVATIONS`).

    Returns:
      `(y, new_moving_mean, new_moving_variance)`. The moving statistics follow
      `moving * momentum + batch * (1 - momentum)` with the biased batch variance,
      and are returned unchanged for a feature whose batch had no element or a
      non-finite statistic.

    With oneDNN on, built for a graph TensorFlow runs op by op with a static
    float32 NHWC input of at least 96 Ki elements (inline training ops,
    `compile.Kernel`), the step is TensorFlow's `FusedBatchNormV3` op and its
    gradient instead (`_tensorflow_fused_training_applies`).
    """
    if _tensorflow_fused_training_applies(x, feature_axes, epsilon, mask):
        y, mean, variance, count = _tensorflow_fused_training(x, gamma, beta, epsilon)
        new_mean, new_variance = updated_moving_statistics(
            moving_mean, moving_variance, mean, variance, count, momentum
        )
        return activate(y, activation), new_mean, new_variance
    mean, variance, count, axes, mask = batch_moments(x, feature_axes, mask)
    gamma_b, beta_b = affine_parameters(x, gamma, beta, feature_axes, tf.shape(moving_mean))
    y = normalize_with_batch_statistics(
        x,
        gamma_b,
        beta_b,
        mean,
        variance,
        count,
        epsilon=epsilon,
        axes=axes,
        mask=mask,
        activation=activation,
    )
    new_mean, new_variance = updated_moving_statistics(
        moving_mean, moving_variance, mean, variance, count, momentum
    )
    return y, new_mean, new_variance


def updated_moving_statistics(moving_mean, moving_variance, mean, variance, count, momentum):
    """Both moving averages after one batch, skipping features without usable statistics.

    `mean`, `variance` and `count` are batch statistics in broadcast shape; the
    results have the per-feature shape of `moving_mean`.
    """
    # The moving averages never carry a gradient to x, in any mode.
    mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
    feature_shape = tf.shape(moving_mean)
    usable = tf.reshape(
        tf.broadcast_to(statistics_are_usable(mean, variance, count), tf.shape(mean)),
        feature_shape,
    )
    new_mean = moving_average(moving_mean, tf.reshape(mean, feature_shape), momentum, usable)
    new_variance = moving_average(
        moving_variance, tf.reshape(variance, feature_shape), momentum, usable
    )
    return new_mean, new_variance


@kernel
def batch_norm_inference(
    x, gamma, beta, mean, variance, *, epsilon, feature_axes, activation=None
):
    """Normalises `x` with given (moving) statistics.

    `y = f(x * scale + shift)` with `scale = γ / sqrt(var + ε)` and
    `shift = β - mean * scale`, computed per feature first, and `f` the fused
    activation (the identity when `activation` is None). Under XLA that is one
    fused pass; in a graph TensorFlow runs op by op and no tape records, a
    float32 NHWC input goes through TensorFlow's `FusedBatchNormV3` instead
    (`_tensorflow_fused_inference_applies`).
    """
    if _tensorflow_fused_inference_applies(x, feature_axes, epsilon):
        y = _tensorflow_fused_inference(x, gamma, beta, mean, variance, epsilon)
        return activate(y, activation)
    rank = x.shape.rank
    scale = tf.math.rsqrt(variance + epsilon)
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta
    if tuple(feature_axes) != (rank - 1,):  # per-channel vectors broadcast on the last axis as they are
        scale = to_broadcast(scale, rank, feature_axes)
        shift = to_broadcast(shift, rank, feature_axes)
    return activate(x * scale + shift, activation)


# cuDNN's smallest epsilon: a served graph may run on a GPU.
_FUSED_MIN_EPSILON = 1.001e-5


def _tensorflow_fused_inference_applies(x, feature_axes, epsilon):
    """Whether inference runs as TensorFlow's `FusedBatchNormV3` op.

    In a graph that TensorFlow runs op by op (`predict` on a CPU, an export)
    and no tape records (`compile.built_untaped`, never set for XLA), for
    float32 NHWC inputs. It is one pass over `x` where the multiply-add is
    two, and TensorFlow's graph optimizer (its remapper) folds it, with a
    following relu, relu6, elu or leaky relu, into a preceding `Conv2D`
    (`_FusedConv2D`), also past the convolution's bias
    (`_tensorflow_fused_inference`): the normalization then costs no pass of
    its own (measured in `benchmarks/models.py`).
    """
    return (
        built_untaped()
        and x.dtype == tf.float32
        and x.shape.rank == 4
        and tuple(feature_axes) == (3,)
        and epsilon >= _FUSED_MIN_EPSILON
    )


def _tensorflow_fused_training_applies(x, feature_axes, epsilon, mask):
    """Whether a training step runs as TensorFlow's `FusedBatchNormV3` op.

    With oneDNN on (TensorFlow's default on x86 CPUs with AVX512-VNNI or
    -BF16, AVX-VNNI or AMX), in a graph TensorFlow runs op by op (not built
    for XLA, where our own kernel fuses with its neighbours), with the
    hand-derived first-order gradient wanted (not
    `differentiable_statistics()`), for the inputs `_onednn_fused_training`
    takes. There oneDNN's kernel is one pass each way where our ops are a
    dozen. Measured on a 2-core AVX-512 EPYC, whole models, Keras ÷ ours
    with fused activations, one process, interleaved: MobileNetV2 1.25 ->
    1.41, EfficientNetB0 1.15 -> 1.21, ResNet50 1.08 -> 1.13, DenseNet121
    1.02 -> 1.17. With oneDNN off, TensorFlow's own kernel was faster than
    ours at some mid-size inputs, slower summed over a model's inputs, and
    no faster in whole models (5 of 6 model and variant pairs 1-7% slower,
    within noise), so our ops stay (docs/benchmarks.md, "oneDNN").
    Its variance is two-pass, as ours (`moments`): at mean 1e4 and unit
    variance, relative error 4e-6 with oneDNN (7e-7 without), against 8e-7
    for ours (float64 reference).
    """
    if built_for_xla() or statistics_are_differentiable():
        return False
    return _onednn_fused_training(x, feature_axes, epsilon, mask)


# Below this many input elements a oneDNN training step keeps our own ops
# (inline under the default XLA policy): oneDNN's batch-norm op and its
# gradient have a fixed cost of about 0.2 ms each per call, more than our
# ops take on a small input. One layer's training step with relu (2-core
# AVX-512 EPYC, 30 interleaved rounds, ms, fused op / our inline ops /
# Keras' BN + relu): 4×1×1×960 0.86 / 0.47 / 0.50, 8×8×8×128 (65536)
# 1.06 / 0.76 / 0.81, 16×4×4×320 (81920) 0.86 / 0.77 / 0.92, 4×16×16×80
# (81920) 1.14 / 0.92 / 1.25, 8×8×8×192 (98304) 0.97 / 1.05 / 1.31,
# 32×6×6×96 (110592) 0.95 / 1.24 / 1.48; with relu6, 16×16×16×128 2.10 /
# 2.89 / 3.39.
# With the op at every size, MobileNetV2 at batch 4 and 32×32 (inputs of
# 640 to 98,304 elements, all but one under this threshold) trained at
# 0.85-0.86× Keras' speed, with the threshold at 0.99-1.10× (two runs;
# docs/benchmarks.md, "Layer by layer").
_FUSED_TRAINING_MIN_ELEMENTS = 96 * 1024


def _tensorflow_fused_training(x, gamma, beta, epsilon):
    """`(y, mean, variance, count)` of a training step by `FusedBatchNormV3`.

    `y = γ (x - mean) / sqrt(variance + ε) + β` with the batch's mean and
    biased variance (the op's unbiased one times (n - 1) / n), both per
    feature, and `count` the constant n; absent γ, β are 1, 0. Its gradient
    is TensorFlow's (`FusedBatchNormGradV3`): dx, dγ and dβ through the batch
    statistics, the formulas of `normalize.normalize_backward`.
    """
    channels = x.shape[3]
    count = x.shape.num_elements() // channels
    ones, zeros = tf.ones([channels], x.dtype), tf.zeros([channels], x.dtype)
    y, mean, unbiased_variance = tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=ones if gamma is None else gamma,
        offset=zeros if beta is None else beta,
        mean=zeros,  # not read in training
        variance=ones,
        epsilon=epsilon,
        exponential_avg_factor=1.0,
        data_format="NHWC",
        is_training=True,
    )[:3]
    variance = unbiased_variance * ((count - 1) / count)
    return y, mean, variance, tf.constant(float(count), x.dtype)


def _per_channel_sum(x):
    """`(a, b)` when the graph computes `x` as `a + b` with `b` one value per
    channel (a bias: Keras' `Conv2D` adds its own as `BiasAdd`), else None.

    Only for a float32 NHWC `x` built in the graph being traced.
    """
    if tf.executing_eagerly() or not hasattr(x, "op"):
        return None
    op = x.op
    # Another reader of the sum would need it computed after all, and
    # without this op TensorFlow's optimizer no longer fuses the addition
    # into the convolution; control inputs would be bypassed.
    if x.consumers() or op.control_inputs:
        return None
    if op.type == "BiasAdd":
        if op.get_attr("data_format") not in (b"NHWC", "NHWC"):
            return None
        pairs = [(op.inputs[0], op.inputs[1])]
    elif op.type in ("AddV2", "Add"):
        pairs = [(op.inputs[0], op.inputs[1]), (op.inputs[1], op.inputs[0])]
    else:
        return None
    channels = x.shape[3]
    if channels is None:
        return None
    per_channel_shapes = ([channels], [1, 1, 1, channels])
    for whole, bias in pairs:
        if (
            bias.shape.rank is not None
            and bias.shape.as_list() in per_channel_shapes
            and whole.shape.rank == 4
            and whole.shape[3] == channels
            and whole.dtype == x.dtype
        ):
            return whole, tf.reshape(bias, [channels])
    return None


def _tensorflow_fused_inference(x, gamma, beta, mean, variance, epsilon):
    """`γ (x - mean) / sqrt(variance + ε) + β` by `FusedBatchNormV3`; absent γ, β are 1, 0.

    When `x` is `a + b` with a per-channel `b` (`_per_channel_sum`: a
    convolution's bias) and nothing else reads `x` yet, the op normalizes `a`
    with the mean `mean - b`: `(a - (mean - b)) k + β` with
    `k = γ / sqrt(variance + ε)`, as accurate as `(x - mean) k + β`.
    TensorFlow's graph optimizer then folds the op into a convolution that
    produces `a`, as it does when there is no bias, and the addition is
    never computed. If such a graph is differentiated later, the gradients
    of `a`, `b`, γ and β stay exact (`b`'s reaches it through a term of the
    offset that is zero in value, `(b - stop_gradient(b)) k`); the moving
    statistics get none, as without the bias; and `x` itself is no longer
    on the path to the output, so a gradient asked of that intermediate
    tensor is None. Measured, ResNet50's
    `predict_on_batch` (batch 16, 64×64; one process, 30 interleaved rounds,
    2-core AVX-512 EPYC), Keras ÷ ours without / with this, two runs: 0.98× /
    1.06× and 1.01× / 1.07× with oneDNN on, 0.99× / 1.09× and 0.95× / 1.06×
    with it off.
    """
    scale = tf.ones_like(mean) if gamma is None else gamma
    offset = tf.zeros_like(mean) if beta is None else beta
    split = _per_channel_sum(x)
    if split is not None:
        x, bias = split
        mean = tf.stop_gradient(mean - bias)
        # Zero in value; its gradient is b's: k Σ dy, with dy the output's.
        bias_path = (bias - tf.stop_gradient(bias)) * scale
        offset = offset + bias_path * tf.math.rsqrt(tf.stop_gradient(variance) + epsilon)
    return tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=scale,
        offset=offset,
        mean=mean,
        variance=variance,
        epsilon=epsilon,
        exponential_avg_factor=1.0,
        data_format="NHWC",
        is_training=False,
    )[0]
