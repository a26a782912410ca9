"""`kerasbn.BatchNorm`: a drop-in `keras.layers.BatchNormalization`."""

import keras
import tensorflow as tf
from keras import initializers

from kerasbn import kernels
from kerasbn.layers import arguments, composite
from kerasbn.layers.precision import read_variable, statistics_dtype
from kerasbn.layers.replicas import cross_replica_sum
from kerasbn.layers.weights import (
    add_affine_weights,
    add_statistic_weight,
    affine_config,
    set_affine_arguments,
)


@keras.saving.register_keras_serializable(package="kerasbn")
class BatchNorm(composite.CompositeInputs, keras.layers.Layer):
    """Batch normalization with XLA-compiled kernels and a hand-derived gradient.

    A drop-in replacement for `keras.layers.BatchNormalization`: same arguments,
    same weights in the same order (`gamma`, `beta`, `moving_mean`,
    `moving_variance`), so `ours.set_weights(keras_bn.get_weights())` transfers a
    trained layer.

    During training (`training=True` and the layer is trainable) it normalizes
    with the statistics of the current batch,
    `y = gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta`, and updates the
    moving statistics once per call with Keras' rule
    `moving = moving * momentum + batch * (1 - momentum)` (biased batch variance).
    At inference (`training=False`, or None outside `fit`) it normalizes with the
    moving statistics and changes nothing.

    About setting `layer.trainable = False`: the layer then runs in inference
    mode even when called with `training=True` (as Keras' layer does since
    TF 2.0), so fine-tuning a frozen backbone neither uses batch statistics nor
    moves the moving statistics.

    Args:
      axis: int or list of ints, default -1. The feature (channel) axis or axes
        that keep their own statistics: -1 for channels-last, 1 for
        channels-first. `ValueError` at build time if out of range, repeated, 0,
        or of unknown size.
      momentum: float in [0, 1), default 0.99. Weight of the old value in the
        moving averages. `ValueError` outside [0, 1).
      epsilon: float > 0, default 1e-3. Added to the variance. `ValueError` if
        not positive.
      center: bool, default True. Add the learned offset `beta`.
      scale: bool, default True. Multiply by the learned `gamma`.
      beta_initializer: default "zeros".
      gamma_initializer: default "ones".
      moving_mean_initializer: default "zeros".
      moving_variance_initializer: default "ones".
      beta_regularizer, gamma_regularizer: default None.
      beta_constraint, gamma_constraint: default None.
      synchronized: bool, default False. Under a `tf.distribute` strategy with
        several replicas (MirroredStrategy, MultiWorkerMirroredStrategy), use
        the statistics of the global batch: one all-reduce per call forward and
        one backward, and identical moving statistics on every replica. Outside
        a strategy it behaves as False. The synchronized step is traced into the
        caller's graph rather than one XLA kernel (collectives cannot run inside
        an XLA cluster on CPU).
      activation: None (default), or the name of an activation applied to the
        normalized output and fused into the kernels, forward and backward (no
        extra pass over memory): "relu", "relu6", "leaky_relu" (slope 0.2),
        "elu", "gelu" (exact), "silu"/"swish", "hard_silu"/"hard_swish",
        "sigmoid", "hard_sigmoid", "tanh", "softplus", "mish"; "linear" is
        None. Each is Keras' `keras.activations` function of that name with its
        default arguments, which may also be passed. `ValueError` for anything
        else.
      jit_compile: bool, default True. Use the XLA-compiled kernels where they
        pay: training steps (a gradient is recorded) at an input shape that
        recurs, compiled once that shape has been used 50 times, for at most 16
        shapes per layer (a warning says when the limit is hit; see
        `kerasbn.kernels.set_xla_policy`). Inference, one-off shapes (the last
        partial batch of an epoch) and calls inside an XLA-compiled step
        (`fit(jit_compile=True)`, which compiles them with the step) run plain
        TensorFlow ops, so no call waits for a compilation of ours at a new
        batch size. With oneDNN on, training on float32 NHWC inputs of a shape
        known while the step is traced (no mask, no ghost batches) is
        TensorFlow's fused batch-norm op instead, oneDNN's kernel, which was
        faster in whole models (docs/xla.md). False: plain TensorFlow ops
        always.
      virtual_batch_size: None (default) or an int >= 1. Ghost batch
        normalization: in training, each slice of `virtual_batch_size`
        consecutive examples (examples 0..v-1, v..2v-1, ...) is normalized
        with its own statistics instead of the whole batch's, in XLA kernels
        with hand-derived gradients like the plain layer's.
        When v does not divide the batch, the last ghost batch holds the
        remaining examples and gets its own statistics; a batch smaller than
        v is one ghost batch. Inference is unchanged (moving statistics, any
        batch size). Masks, `activation` and mixed precision apply per ghost
        batch. With `synchronized=True` ghost batches are cut within each
        replica's batch and normalized locally; only the moving statistics
        are combined over replicas (one all-reduce per call), so they are
        identical on every replica. `ValueError` if not None or an int >= 1
        (a bool, a float, 0 or a negative number).
      moving_statistics: "batch" (default) or "ghost_mean". What the moving
        averages follow when `virtual_batch_size` is set. "batch": the exact
        mean and biased variance of the whole batch, from its ghost batches by
        the law of total variance (what `kerasbn.recalibrate` computes).
        "ghost_mean": tf_keras' rule, the mean of the ghost batches' means and
        of their variances (weighted by their element counts, i.e. equally
        when v divides the batch and nothing is masked); its moving variance
        leaves out the spread of the ghost means. For models migrated from
        tf_keras. Without `virtual_batch_size` both are the batch statistics.
        `ValueError` for any other value.
      **kwargs: base `Layer` arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
      inputs: tensor of rank 2 to 5 (or any rank >= 2), or a
        `tf.RaggedTensor`, normalized as Keras' layer does: statistics over
        its flat values (every element of every row), output ragged with the
        same rows. Int and bool inputs are cast to float, as Keras does.
        `TypeError` for a `tf.SparseTensor`, strings or complex numbers, and
        for a feature axis along a ragged dimension.
      training: bool or None. None means inference, except inside `fit`.
      mask: optional boolean tensor with the input's shape without the feature
        axes (rank one less for a single axis). Masked positions are excluded
        from the batch statistics (NaN there never leaks into them) but are
        still normalized. `ValueError` for a mask of the wrong rank or shape.
        With ragged inputs, a ragged mask with the same rows (as
        `Embedding(mask_zero=True)` gives): `TypeError` for a dense one,
        `ValueError` for other row lengths.

    Edge cases:
      - A batch whose statistics are taken over one element per feature (a
        batch of one dense vector) has zero variance: the output is `beta`,
        and the moving variance moves toward 0, exactly as in Keras.
      - An empty batch, or a fully masked one, has no statistics: the output
        (where there is one) is `beta`, never NaN, and the moving statistics
        are not updated.
      - NaN or inf in the (unmasked) input: the output is NaN for the affected
        features, and their moving statistics keep their previous value rather
        than becoming NaN. Other features update normally.
      - With `virtual_batch_size`, the same rules hold per ghost batch: a
        ghost batch of one example per feature (rank 2) has zero variance and
        outputs `beta`, a fully masked ghost batch outputs `beta`, and the
        moving statistics skip a feature only when the whole batch has no
        element (or a non-finite statistic) there.

    Mixed precision: under `mixed_float16` or `mixed_bfloat16` the statistics,
    the weights and the arithmetic are float32 and the output has the compute
    dtype. Inputs are not autocast, so float32 inputs above float16's range
    normalize correctly instead of overflowing to inf.

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
      by Reducing Internal Covariate Shift", ICML 2015.
      Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the
      generalization gap in large batch training of neural networks", NeurIPS
      2017 (ghost batch normalization).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized=False,
        activation=None,
        jit_compile=True,
        virtual_batch_size=None,
        moving_statistics="batch",
        **kwargs,
    ):
        # Inputs are upcast by the layer itself: Keras' autocast would turn a
        # float32 input above 65504 into inf under mixed_float16.
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        self.axis = arguments.check_axis_argument(axis)
        self.momentum = arguments.check_momentum(momentum)
        self.epsilon = arguments.check_epsilon(epsilon)
        self.synchronized = arguments.check_bool(synchronized, "synchronized")
        self.activation = arguments.check_activation(activation)
        self.jit_compile = arguments.check_bool(jit_compile, "jit_compile")
        self.virtual_batch_size = arguments.check_virtual_batch_size(virtual_batch_size)
        self.moving_statistics = arguments.check_moving_statistics(moving_statistics)
        set_affine_arguments(
            self,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
        )
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.supports_masking = True
        # When this layer's training kernels are worth compiling (see
        # kernels/warmup.py); not a weight, not saved.
        self._shape_use = kernels.ShapeUse(f"layer {self.name!r}")
        self.moving_mean = None
        self.moving_variance = None
        self.feature_axes = None

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self.feature_axes = arguments.resolve_axes(self.axis, input_shape)
        shape = tuple(input_shape[axis] for axis in self.feature_axes)
        add_affine_weights(self, shape)
        add_statistic_weight(self, "moving_mean", shape, self.moving_mean_initializer)
        add_statistic_weight(
            self, "moving_variance", shape, self.moving_variance_initializer
        )
        self.input_spec = keras.layers.InputSpec(
            ndim=len(input_shape),
            axes={axis: input_shape[axis] for axis in self.feature_axes},
        )

    def compute_output_shape(self, input_shape):
        arguments.resolve_axes(self.axis, tuple(input_shape))
        return tuple(input_shape)

    def compute_mask(self, inputs, mask=None):
        return mask

    # -- helpers shared with BatchRenorm -------------------------------------

    def _prepare(self, inputs, mask):
        """Validates the mask and upcasts inputs and weights for the kernels."""
        if mask is not None:
            arguments.check_mask_shape(tuple(mask.shape), tuple(inputs.shape), self.feature_axes)
        dtype = statistics_dtype(inputs.dtype, self.variable_dtype)
        x = tf.cast(inputs, dtype)
        gamma = read_variable(self.gamma, dtype)
        beta = read_variable(self.beta, dtype)
        return x, gamma, beta

    def _is_training(self, training):
        return bool(training) and self.trainable

    def _inference(self, x, gamma, beta):
        mean = read_variable(self.moving_mean, x.dtype)
        variance = read_variable(self.moving_variance, x.dtype)
        return kernels.batch_norm_inference(
            x,
            gamma,
            beta,
            mean,
            variance,
            epsilon=self.epsilon,
            feature_axes=self.feature_axes,
            activation=self.activation,
            jit_compile=self.jit_compile,
            shape_use=self._shape_use,
        )

    def _finish(self, y):
        return tf.cast(y, self.compute_dtype)

    def _step_parts(self):
        """`(state names, limits, options)`: what this layer's training step
        adds to the shared ones (`BatchRenorm`: its limits and averages)."""
        return ("moving_mean", "moving_variance"), None, {}

    def _after_step(self, new_state):
        """Assigns the new moving statistics."""
        for name, value in new_state.items():
            variable = getattr(self, name)
            variable.assign(tf.cast(value, variable.dtype))

    # -------------------------------------------------------------------------

    def call(self, inputs, training=None, mask=None):
        if isinstance(inputs, tf.RaggedTensor):
            return composite.call_ragged(self, inputs, mask, training=training)
        x, gamma, beta = self._prepare(inputs, mask)
        if not self._is_training(training):
            return self._finish(self._inference(x, gamma, beta))
        names, limits, options = self._step_parts()
        y, new_state = kernels.train_step(
            x,
            gamma,
            beta,
            {name: read_variable(getattr(self, name), x.dtype) for name in names},
            mask,
            limits,
            momentum=self.momentum,
            epsilon=self.epsilon,
            feature_axes=self.feature_axes,
            virtual_batch_size=self.virtual_batch_size,
            moving_statistics=self.moving_statistics,
            all_reduce=cross_replica_sum() if self.synchronized else None,
            activation=self.activation,
            jit_compile=self.jit_compile,
            shape_use=self._shape_use,
            **options,
        )
        self._after_step(new_state)
        return self._finish(y)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                **affine_config(self),
                "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
                "moving_variance_initializer": initializers.serialize(
                    self.moving_variance_initializer
                ),
                "synchronized": self.synchronized,
                "activation": self.activation,
                "jit_compile": self.jit_compile,
                "virtual_batch_size": self.virtual_batch_size,
                "moving_statistics": self.moving_statistics,
            }
        )
        return config
