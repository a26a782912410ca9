"""Activations fused into the normalization kernels: value and derivative.

A normalization followed by an activation, `y = f(z)` with `z = (x − μ) k + c`,
costs one extra pass over memory forward and one backward when `f` runs as its
own op. Fused and compiled by XLA, the forward applies `f` in the same loop
that writes `y`, and the backward never stores `z`: it recomputes `z` from `x`
where it needs `f'(z)` (one multiply-add per element, inside loops that read
`x` anyway) and uses `dz = dy · f'(z)` in place of `dy`. A graph that
TensorFlow runs op by op (not built for XLA) keeps `z` instead, as separate
layers do, and uses TensorFlow's own gradient op where there is one.

Each activation is Keras' function of that name with its default arguments
(`keras.activations.<name>`), written here with TensorFlow ops, with its
derivative written out. At a kink (relu at 0, relu6 at 0 and 6, hard sigmoid
at ±3) the derivative takes the value TensorFlow's own gradient gives there.
"""

import math

import numpy as np
import tensorflow as tf


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
LEAKY_RELU_SLOPE = 0.2  # keras.activations.leaky_relu's default


def _const(value, like):
    return tf.constant(value, like.dtype)


def _between(z, low, high):
    """1 where low < z < high, else 0, in z's dtype."""
    inside = tf.logical_and(z > _const(low, z), z < _const(high, z))
    return tf.cast(inside, z.dtype)


def _relu(z):
    return tf.nn.relu(z)


def _relu_derivative(z):
    return tf.cast(z > 0, z.dtype)


def _relu6(z):
    return tf.nn.relu6(z)


def _relu6_derivative(z):
    return _between(z, 0.0, 6.0)


def _leaky_relu(z):
    return tf.nn.leaky_relu(z, alpha=LEAKY_RELU_SLOPE)


def _leaky_relu_derivative(z):
    # TensorFlow's LeakyRelu keeps its slope as a float32 attribute, also in
    # float64: the forward's slope is float32(0.2), so is its derivative.
    slope = _const(float(np.float32(LEAKY_RELU_SLOPE)), z)
    return tf.where(z > 0, tf.ones_like(z), tf.fill(tf.shape(z), slope))


def _elu(z):
    return tf.nn.elu(z)


def _elu_derivative(z):
    # d/dz (exp(z) - 1) = exp(z) below 0; exp(min(z, 0)) never overflows.
    return tf.where(z > 0, tf.ones_like(z), tf.exp(tf.minimum(z, 0.0)))


def _normal_cdf(z):
    # Φ(z) = erfc(−z/√2) / 2: erfc keeps its digits in the far negative tail,
    # where 1 + erf(z/√2) cancels.
    return 0.5 * tf.math.erfc(-z * _INV_SQRT2)


def _gelu(z):
    # The exact form z Φ(z) (Keras' default, approximate=False).
    return z * _normal_cdf(z)


def _gelu_derivative(z):
    # Φ(z) + z φ(z)
    return _normal_cdf(z) + z * _INV_SQRT_2PI * tf.exp(-0.5 * tf.square(z))


def _silu(z):
    return z * tf.sigmoid(z)


def _silu_derivative(z):
    # σ(z) (1 + z (1 − σ(z)))
    s = tf.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _hard_sigmoid(z):
    return tf.nn.relu6(z + 3.0) / 6.0


def _hard_sigmoid_derivative(z):
    return _between(z, -3.0, 3.0) / 6.0


def _hard_silu(z):
    return z * _hard_sigmoid(z)


def _hard_silu_derivative(z):
    return _hard_sigmoid(z) + z * _hard_sigmoid_derivative(z)


def _sigmoid(z):
    return tf.sigmoid(z)


def _sigmoid_derivative(z):
    s = tf.sigmoid(z)
    return s * (1.0 - s)


def _tanh(z):
    return tf.tanh(z)


def _tanh_derivative(z):
    return 1.0 - tf.square(tf.tanh(z))


def _softplus(z):
    return tf.math.softplus(z)


def _softplus_derivative(z):
    return tf.sigmoid(z)


def _mish(z):
    return z * tf.tanh(tf.math.softplus(z))


def _mish_derivative(z):
    # tanh(sp(z)) + z σ(z) (1 − tanh²(sp(z)))
    t = tf.tanh(tf.math.softplus(z))
    return t + z * tf.sigmoid(z) * (1.0 - tf.square(t))


# name -> (f, f')
_FUNCTIONS = {
    "relu": (_relu, _relu_derivative),
    "relu6": (_relu6, _relu6_derivative),
    "leaky_relu": (_leaky_relu, _leaky_relu_derivative),
    "elu": (_elu, _elu_derivative),
    "gelu": (_gelu, _gelu_derivative),
    "silu": (_silu, _silu_derivative),
    "hard_silu": (_hard_silu, _hard_silu_derivative),
    "sigmoid": (_sigmoid, _sigmoid_derivative),
    "hard_sigmoid": (_hard_sigmoid, _hard_sigmoid_derivative),
    "tanh": (_tanh, _tanh_derivative),
    "softplus": (_softplus, _softplus_derivative),
    "mish": (_mish, _mish_derivative),
}

ACTIVATIONS = tuple(_FUNCTIONS)
"""The canonical names of the activations the kernels can fuse."""


def _check(name):
    if name not in _FUNCTIONS:
        raise ValueError(
            f"Unknown fused activation {name!r}; expected None or one of {', '.join(ACTIVATIONS)}."
        )


def activate(z, name):
    """`f(z)` for the activation `name` (None: the identity)."""
    if name is None:
        return z
    _check(name)
    return _FUNCTIONS[name][0](z)


# TensorFlow's own gradient ops, one pass over memory where `dy * f'(z)` is
# three (compare, cast, multiply) when a graph runs op by op. XLA fuses either
# form into one loop, so graphs built for it keep the formula.
_GRADIENT_OPS = {
    "relu": lambda dy, z: tf.raw_ops.ReluGrad(gradients=dy, features=z),
    "relu6": lambda dy, z: tf.raw_ops.Relu6Grad(gradients=dy, features=z),
    "leaky_relu": lambda dy, z: tf.raw_ops.LeakyReluGrad(
        gradients=dy, features=z, alpha=LEAKY_RELU_SLOPE
    ),
}


def activation_gradient(dy, z, name, build):
    """`dy · f'(z)`: the gradient reaching `z` through the activation `name`.

    `z` is the pre-activation (the normalized value); with `name` None this is
    `dy` itself.
    """
    if name is None:
        return dy
    _check(name)
    if name in _GRADIENT_OPS and not build.for_xla:
        return _GRADIENT_OPS[name](dy, z)
    return dy * _FUNCTIONS[name][1](z)
