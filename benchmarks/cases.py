"""What is measured: shapes, layers (ours and the anchors) and the steps around them.

Every layer, ours and the anchors alike, is called the way a user calls it: the
public Keras layer inside a `tf.function` with a `GradientTape`. A training step
is the forward pass in training mode, the loss `sum(y²)` and the gradient with
respect to the input and the layer's trainable weights (moving statistics are
updated as a side effect, as in `fit`). Inference is the forward pass with
`training=False`. The `tf.function` around the step is compiled with XLA or not
according to the case ("jit" below); our layers also compile their own kernels
with XLA whatever the step does.

Two floors are measured in the same run: a copy of `x` (one read and one write
of the input, what any layer must at least do), and for inference a
jit-compiled `x * scale + shift` with per-channel `scale` and `shift`.
"""

import dataclasses

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Shape:
    """An input shape and its feature axis."""

    shape: tuple
    axis: int
    layout: str

    @property
    def label(self):
        return "×".join(str(d) for d in self.shape) + f" {self.layout}"

    @property
    def channels(self):
        return self.shape[self.axis]


# The two shapes of the issue, a channels-first and a rank-2 case, and the group norm inputs of
# small-batch detection or segmentation models.
FULL_SHAPES = (
    Shape((64, 56, 56, 64), -1, "NHWC"),
    Shape((32, 32, 32, 64), -1, "NHWC"),
    Shape((32, 64, 32, 32), 1, "NCHW"),
    Shape((4096, 1024), -1, "NC"),
    Shape((2, 128, 128, 64), -1, "NHWC"),
    Shape((4, 64, 64, 256), -1, "NHWC"),
)
QUICK_SHAPES = (
    Shape((8, 8, 8, 32), -1, "NHWC"),
    Shape((8, 32, 8, 8), 1, "NCHW"),
    Shape((64, 64), -1, "NC"),
)
# Large enough for the allocator to track the step's buffers (tiny tensors
# come from caches it does not count).
QUICK_MEMORY_SHAPE = Shape((32, 16, 16, 64), -1, "NHWC")
# The shape the targets are stated on, and those of group norm's in copies of x.
TARGET_SHAPE = FULL_SHAPES[0]
GROUP_NORM_TARGET_SHAPES = (FULL_SHAPES[0], FULL_SHAPES[4], FULL_SHAPES[5])

GROUPS = 32


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A layer to benchmark.

    `family` is "bn" (batch norm, and batch renorm), "gn" or "floor"; `ours`
    tells our layers from the anchors; `step_jit` is the `jit_compile` of the
    `tf.function` around the step.
    """

    key: str
    title: str
    family: str
    ours: bool
    step_jit: bool
    make: object  # callable(Shape) -> layer, or None when unavailable


def _ours(name, **kwargs):
    def make(shape):
        import kerasbn

        cls = getattr(kerasbn, name, None)
        return None if cls is None else cls(axis=shape.axis, **kwargs)

    return make


def _keras(name, **kwargs):
    def make(shape):
        import keras

        return getattr(keras.layers, name)(axis=shape.axis, **kwargs)

    return make


def _fused_bn(shape):
    import tf_keras

    # The fused kernel exists for rank 4 and 5 only; tf_keras picks the
    # unfused graph for other ranks when `fused=None`.
    fused = True if len(shape.shape) in (4, 5) else None
    return tf_keras.layers.BatchNormalization(axis=shape.axis, fused=fused)


class Identity:
    """A layer returning its input: the training step's own cost (loss, its gradient) without
    any normalization, the floor of a step as `copy_step` is of a pass."""

    trainable_weights = ()

    def __call__(self, x, training=None):
        return tf.identity(x)

    def build(self, shape):
        del shape


def _identity(shape):
    del shape
    return Identity()


def available(name):
    """Whether `kerasbn` exports `name` (layers written concurrently may not)."""
    import kerasbn

    return hasattr(kerasbn, name)


_RENORM = dict(renorm_momentum=0.99, r_max=3.0, d_max=5.0)
# Ghost batch norm: 16 examples per ghost batch (4 of them in a batch of 64).
VIRTUAL_BATCH_SIZE = 16

LAYERS = (
    LayerSpec("identity", "identity layer (step floor)", "floor", False, False, _identity),
    LayerSpec("identity_jit", "identity layer (step floor), jit", "floor", False, True, _identity),
    LayerSpec("ours_bn", "ours BN", "bn", True, False, _ours("BatchNorm")),
    LayerSpec("ours_bn_jit", "ours BN, jit", "bn", True, True, _ours("BatchNorm")),
    LayerSpec("ours_brn", "ours BRN", "bn", True, False, _ours("BatchRenorm", **_RENORM)),
    LayerSpec("ours_brn_jit", "ours BRN, jit", "bn", True, True, _ours("BatchRenorm", **_RENORM)),
    LayerSpec(
        "ours_gbn",
        f"ours ghost BN (v={VIRTUAL_BATCH_SIZE})",
        "ghost",
        True,
        False,
        _ours("BatchNorm", virtual_batch_size=VIRTUAL_BATCH_SIZE),
    ),
    LayerSpec(
        "ours_gbn_jit",
        f"ours ghost BN (v={VIRTUAL_BATCH_SIZE}), jit",
        "ghost",
        True,
        True,
        _ours("BatchNorm", virtual_batch_size=VIRTUAL_BATCH_SIZE),
    ),
    LayerSpec("fused_bn", "tf_keras fused BN", "bn", False, False, _fused_bn),
    LayerSpec("keras_bn", "Keras 3 BN", "bn", False, False, _keras("BatchNormalization")),
    LayerSpec("keras_bn_jit", "Keras 3 BN, jit", "bn", False, True, _keras("BatchNormalization")),
    LayerSpec("ours_gn", "ours GN", "gn", True, False, _ours("GroupNorm", groups=GROUPS)),
    LayerSpec("ours_gn_jit", "ours GN, jit", "gn", True, True, _ours("GroupNorm", groups=GROUPS)),
    LayerSpec(
        "keras_gn", "Keras 3 GN", "gn", False, False, _keras("GroupNormalization", groups=GROUPS)
    ),
    LayerSpec(
        "keras_gn_jit",
        "Keras 3 GN, jit",
        "gn",
        False,
        True,
        _keras("GroupNormalization", groups=GROUPS),
    ),
)
LAYERS_BY_KEY = {spec.key: spec for spec in LAYERS}


def make_input(shape, seed=0):
    """A float32 input of `shape` (not centred, not unit variance)."""
    rng = np.random.default_rng(seed)
    return tf.constant(rng.normal(1.0, 2.0, shape.shape).astype("float32"))


def steady_state_policy():
    """Our layers run their XLA training programs from the first call.

    In a user's program they do so once an input shape has recurred
    (`kerasbn.kernels.get_xla_policy()`, 50 training calls by default); the
    layer benchmarks measure that steady state, and their first-call table the
    XLA compile it costs.
    """
    import kerasbn

    kerasbn.kernels.set_xla_policy(warmup_calls=0)


def build_layer(spec, shape):
    """The built layer for `spec`, or None when the layer does not exist yet."""
    steady_state_policy()
    layer = spec.make(shape)
    if layer is None:
        return None
    layer.build(shape.shape)
    return layer


def _trainable(layer):
    return list(layer.trainable_weights)


def training_step(layer, jit):
    """`step(x)`: forward in training mode, loss sum(y²), gradients of x and weights."""
    weights = _trainable(layer)

    @tf.function(jit_compile=jit)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.square(y))
        return tape.gradient(loss, [x] + weights)

    return step


def inference_step(layer, jit):
    """`step(x)`: the forward pass with `training=False`."""

    @tf.function(jit_compile=jit)
    def step(x):
        return layer(x, training=False)

    return step


def copy_step():
    """One read and one write of `x`, jit-compiled: the memory-traffic floor."""
    offset = tf.Variable(0.0)

    @tf.function(jit_compile=True)
    def step(x):
        return x + offset

    return step


def affine_step(shape):
    """The inference floor: a jit-compiled `x * scale + shift`, per channel."""
    broadcast = [1] * len(shape.shape)
    broadcast[shape.axis] = shape.channels
    scale = tf.Variable(tf.fill(broadcast, 0.5))
    shift = tf.Variable(tf.fill(broadcast, 0.25))

    @tf.function(jit_compile=True)
    def step(x):
        return x * scale + shift

    return step
