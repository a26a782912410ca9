"""Activations fused into the normalization kernels: value and derivative.

Each is `keras.activations.<name>` with its default arguments. The backward's `dz = dy · f'(z)`
recomputes `z` under XLA; in a graph run op by op it keeps the output `y` where `f'` is a function
of it, with TensorFlow's gradient op of that output, else `z`
(docs/decisions/019-keep-pre-activation-and-gradient-ops.md, 026); at a kink (relu at 0, relu6 at
0 and 6, hard sigmoid at ±3) the derivative is the value TensorFlow's gives.
"""

import math

import numpy as np
import tensorflow as tf

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
LEAKY_RELU_SLOPE = 0.2  # keras.activations.leaky_relu's default


def _between(z, low, high):
    """1 where low < z < high, else 0, in z's dtype."""
    inside = tf.logical_and(z > tf.constant(low, z.dtype), z < tf.constant(high, z.dtype))
    return tf.cast(inside, z.dtype)


def _leaky_relu_derivative(z):
    # LeakyRelu keeps its slope as a float32 attribute, also in float64: so does its derivative.
    slope = tf.constant(float(np.float32(LEAKY_RELU_SLOPE)), z.dtype)
    return tf.where(z > 0, tf.ones_like(z), tf.fill(tf.shape(z), slope))


def _normal_cdf(z):
    # Φ(z) = erfc(−z/√2) / 2: erfc keeps its digits in the far negative tail (1 + erf cancels).
    return 0.5 * tf.math.erfc(-z * _INV_SQRT2)


def _silu_derivative(z):
    s = tf.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))  # σ(z) (1 + z (1 − σ(z)))


def _hard_sigmoid(z):
    return tf.nn.relu6(z + 3.0) / 6.0


def _hard_sigmoid_derivative(z):
    return _between(z, -3.0, 3.0) / 6.0


def _sigmoid_derivative(z):
    s = tf.sigmoid(z)
    return s * (1.0 - s)


def _mish_derivative(z):
    t = tf.tanh(tf.math.softplus(z))  # f' = tanh(sp(z)) + z σ(z) (1 − tanh²(sp(z)))
    return t + z * tf.sigmoid(z) * (1.0 - tf.square(t))


# name -> (f, f')
_FUNCTIONS = {
    "relu": (tf.nn.relu, lambda z: tf.cast(z > 0, z.dtype)),
    "relu6": (tf.nn.relu6, lambda z: _between(z, 0.0, 6.0)),
    "leaky_relu": (lambda z: tf.nn.leaky_relu(z, alpha=LEAKY_RELU_SLOPE), _leaky_relu_derivative),
    # Below 0, d/dz (exp(z) − 1) = exp(z); exp(min(z, 0)) never overflows.
    "elu": (tf.nn.elu, lambda z: tf.where(z > 0, tf.ones_like(z), tf.exp(tf.minimum(z, 0.0)))),
    # The exact form z Φ(z) (Keras' default, approximate=False); f' = Φ(z) + z φ(z).
    "gelu": (
        lambda z: z * _normal_cdf(z),
        lambda z: _normal_cdf(z) + z * _INV_SQRT_2PI * tf.exp(-0.5 * tf.square(z)),
    ),
    "silu": (lambda z: z * tf.sigmoid(z), _silu_derivative),
    "hard_silu": (
        lambda z: z * _hard_sigmoid(z),
        lambda z: _hard_sigmoid(z) + z * _hard_sigmoid_derivative(z),
    ),
    "sigmoid": (tf.sigmoid, _sigmoid_derivative),
    "hard_sigmoid": (_hard_sigmoid, _hard_sigmoid_derivative),
    "tanh": (tf.tanh, lambda z: 1.0 - tf.square(tf.tanh(z))),
    "softplus": (tf.math.softplus, tf.sigmoid),
    "mish": (lambda z: z * tf.tanh(tf.math.softplus(z)), _mish_derivative),
}

ACTIVATIONS = tuple(_FUNCTIONS)  # the canonical names of the activations the kernels can fuse


def _functions(name):
    """`(f, f')` of the activation `name`; `ValueError` for an unknown name."""
    if name not in _FUNCTIONS:
        raise ValueError(
            f"Unknown fused activation {name!r}; expected None or one of {', '.join(ACTIVATIONS)}."
        )
    return _FUNCTIONS[name]


def activate(z, name):
    """`f(z)` for the activation `name` (None: the identity); `ValueError` for an unknown name."""
    return z if name is None else _functions(name)[0](z)


# Activations whose derivative is a function of their output, with TensorFlow's gradient op
# taking that output: a graph run op by op keeps the output, which the next layer keeps anyway,
# instead of a pre-activation of its own (docs/decisions/026-activation-gradient-from-the-output.md).
_OUTPUT_GRADIENT_OPS = {
    "relu": lambda dy, y: tf.raw_ops.ReluGrad(gradients=dy, features=y),
    "relu6": lambda dy, y: tf.raw_ops.Relu6Grad(gradients=dy, features=y),
    # The slope is positive: y > 0 exactly where z > 0.
    "leaky_relu": lambda dy, y: tf.raw_ops.LeakyReluGrad(gradients=dy, features=y, alpha=LEAKY_RELU_SLOPE),
    "elu": lambda dy, y: tf.raw_ops.EluGrad(gradients=dy, outputs=y),
    "sigmoid": lambda dy, y: tf.raw_ops.SigmoidGrad(y=y, dy=dy),
    "tanh": lambda dy, y: tf.raw_ops.TanhGrad(y=y, dy=dy),
}


def activate_taped(z, name):
    """`f(z)` whose recorded gradient keeps one tensor, `y` where `f'` is a function of it, else
    `z`: TensorFlow's autodiff of the formulas keeps more (silu's `z` and `σ(z)`, leaky relu's
    input beside its output)."""
    if name is None:
        return z

    @tf.custom_gradient
    def forward(z):
        y = activate(z, name)
        kept = y if name in _OUTPUT_GRADIENT_OPS else z
        return y, lambda dy: gradient_from_kept(dy, kept, name)

    return forward(z)


# Their gradient ops read only the sign of what they are given, the same in `z` as in `y`.
_SIGN_GRADIENTS = ("relu", "relu6", "leaky_relu")


def kept_for_gradient(z, y, name, build):
    """What the backward of `y = f(z)` keeps: nothing under XLA (`z` is recomputed inside the
    passes that read `x` anyway), else `y` where `f'` is a function of it, else `z`. A backward
    program (`build.residuals` set) recomputes the forward and keeps nothing between programs:
    there relu's family reads `z`, which spares it computing `y`."""
    if name is None or build.for_xla:
        return None
    if name in _SIGN_GRADIENTS and build.residuals is not None:
        return z
    return y if name in _OUTPUT_GRADIENT_OPS else z


def gradient_from_kept(dy, kept, name):
    """`dy · f'(z)` from `kept_for_gradient`'s tensor (not None): TensorFlow's gradient op of the
    output, or of `z` for relu's family (one pass over memory where compare, cast and multiply
    are three), else the formula in `z`; `ValueError` for an unknown name."""
    if name in _OUTPUT_GRADIENT_OPS:
        return _OUTPUT_GRADIENT_OPS[name](dy, kept)
    return dy * _functions(name)[1](kept)


def activation_gradient(dy, z, name):
    """`dy · f'(z)` by its formula (fused by XLA into the passes around it), the gradient reaching
    the pre-activation `z` (`dy` when `name` is None); `ValueError` for an unknown name."""
    return dy if name is None else dy * _functions(name)[1](z)
