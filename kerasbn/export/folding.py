"""The arithmetic of folding an inference-mode batch norm into the layer before it.

At inference a batch normalization layer is a per-channel affine map,

    BN(y) = γ (y - μ) / sqrt(σ² + ε) + β = a·y + b,
    a = γ / sqrt(σ² + ε),   b = β - μ·a,

with the moving mean μ and variance σ². When `y = x ⊛ K + c` comes from a
convolution or a dense layer whose kernel `K` has the output channels on its
last axis, `a·y + b = x ⊛ (K·a) + (c·a + b)`: scaling the kernel's output
channels and the bias folds the normalization away. A depthwise kernel of shape
`(*spatial, in, multiplier)` produces output channel `i·multiplier + m` from
`K[..., i, m]`, so `a` is reshaped to `(in, multiplier)` first.

Everything here is NumPy on float64 values and knows nothing of Keras.
"""

import numpy as np

# Kernel layouts.
OUTPUT_LAST = "output_last"  # Dense (in, out); ConvND (*spatial, in/groups, out)
DEPTHWISE = "depthwise"  # DepthwiseConvND (*spatial, in, multiplier)
KERNEL_LAYOUTS = (OUTPUT_LAST, DEPTHWISE)


def batchnorm_affine(mean, variance, epsilon, gamma=None, beta=None):
    """The per-channel `(a, b)` with `BN(y) = a·y + b` at inference.

    Args:
      mean, variance: 1-D arrays, the moving statistics.
      epsilon: float > 0 added to the variance.
      gamma: 1-D array or None (no scale: ones).
      beta: 1-D array or None (no offset: zeros).

    Returns:
      `(scale, shift)`, float64 arrays of the statistics' shape.

    Raises:
      ValueError: if the arrays are not 1-D of one length, or `epsilon` is
        negative, or `variance + epsilon` has a non-positive entry.
    """
    mean = np.asarray(mean, np.float64)
    variance = np.asarray(variance, np.float64)
    gamma = np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64)
    shapes = {a.shape for a in (mean, variance, gamma, beta)}
    if len(shapes) != 1 or mean.ndim != 1:
        raise ValueError(
            "mean, variance, gamma and beta must be 1-D arrays of one length; "
            f"received shapes {[a.shape for a in (mean, variance, gamma, beta)]}."
        )
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0; received epsilon={epsilon!r}.")
    denominator = variance + float(epsilon)
    if np.any(denominator <= 0):
        raise ValueError("variance + epsilon must be positive for every channel.")
    scale = gamma / np.sqrt(denominator)
    shift = beta - mean * scale
    return scale, shift


def channel_scale_for_kernel(scale, kernel_shape, layout):
    """`scale` (per output channel) shaped to broadcast against the kernel.

    Raises:
      ValueError: for an unknown layout, or a kernel whose output channels do
        not number `len(scale)`.
    """
    scale = np.asarray(scale)
    kernel_shape = tuple(kernel_shape)
    if layout == OUTPUT_LAST:
        channels = kernel_shape[-1]
        target = (channels,)
    elif layout == DEPTHWISE:
        if len(kernel_shape) < 3:
            raise ValueError(f"A depthwise kernel has rank >= 3; received shape {kernel_shape}.")
        channels = kernel_shape[-2] * kernel_shape[-1]
        target = kernel_shape[-2:]
    else:
        raise ValueError(f"layout must be one of {KERNEL_LAYOUTS}; received {layout!r}.")
    if scale.shape != (channels,):
        raise ValueError(
            f"The kernel of shape {kernel_shape} ({layout}) has {channels} output "
            f"channels but the normalization has {scale.shape[0] if scale.ndim else 0}."
        )
    return scale.reshape(target)


def fold_affine_into_kernel(kernel, bias, scale, shift, layout=OUTPUT_LAST):
    """Kernel and bias computing `a·(x ⊛ K + c) + b` as one layer.

    Args:
      kernel: the layer's kernel array (output channels last, or a depthwise
        kernel `(*spatial, in, multiplier)` with `layout=DEPTHWISE`).
      bias: 1-D array of output channels, or None for a layer without bias.
      scale, shift: the per-output-channel `(a, b)` of `batchnorm_affine`.
      layout: `OUTPUT_LAST` (default) or `DEPTHWISE`.

    Returns:
      `(folded_kernel, folded_bias)` in the kernel's dtype (float64 arithmetic).

    Raises:
      ValueError: if the shapes do not agree (see `channel_scale_for_kernel`).
    """
    kernel = np.asarray(kernel)
    dtype = kernel.dtype if np.issubdtype(kernel.dtype, np.floating) else np.float32
    scale = np.asarray(scale, np.float64)
    shift = np.asarray(shift, np.float64)
    if shift.shape != scale.shape:
        raise ValueError(f"scale and shift differ in shape: {scale.shape} vs {shift.shape}.")
    kernel_scale = channel_scale_for_kernel(scale, kernel.shape, layout)
    folded_kernel = kernel.astype(np.float64) * kernel_scale
    bias = np.zeros_like(scale) if bias is None else np.asarray(bias, np.float64)
    if bias.shape != scale.shape:
        raise ValueError(f"bias of shape {bias.shape} does not match {scale.shape[0]} channels.")
    folded_bias = bias * scale + shift
    return folded_kernel.astype(dtype), folded_bias.astype(dtype)
