"""The training step of batch normalisation, assembled once for every variant.

A layer chooses parts, not functions:

- statistics: the local batch (default), the global batch across replicas
  (`all_reduce`: `synchronized.py`), or ghost batches (`virtual_batch_size`:
  `ghost_batch_norm.py`), whose moving statistics can be global too;
- correction: none (batch norm) or Ioffe's renormalisation toward the renorm
  averages (`limits`: `batch_renorm.py`);
- activation: fused into the normalisation, forward and backward;
- moving update: the moving mean and variance, and renorm's three more.

`normalize_batch` is the kernel the router runs: statistics, corrections, the normalisation with its
hand-derived gradient (`normalize.py`) and the moving update (`updated_state`), all inside its
programs on a program route. Only ghost batches' moving statistics all-reduced across replicas are
updated after it, in the caller's graph, where collectives run.
"""

import tensorflow as tf

from kerasbn.kernels import fused_op
from kerasbn.kernels.axes import mask_to_broadcast, reduction_axes, to_broadcast
from kerasbn.kernels.batch_norm import affine_parameters, statistics_are_usable, updated_moving_statistics
from kerasbn.kernels.batch_renorm import renorm_corrections, updated_renorm_statistics
from kerasbn.kernels.engine import FusedForm, kernel
from kerasbn.kernels.ghost_batch_norm import combine_ghosts, ghost_parts, moving_statistics_of
from kerasbn.kernels.moments import moments
from kerasbn.kernels.normalize import normalize_with_batch_statistics
from kerasbn.kernels.synchronized import combine_moments


class Part:
    """A piece of the batch normalised with its own statistics: the whole batch, the remainder of a
    ghost split (one ghost batch), or the full ghost batches stacked as `[q, v, ...]` (`ghost_axis`,
    one statistic per ghost batch). `stored`: `values` is in memory as it is, not a slice of the
    input (`moments.moments`)."""

    def __init__(self, values, mask, feature_axes, ghost_axis, build, stored=False):
        lead = 1 if ghost_axis else 0
        self.values, self.mask, self.ghost_axis = values, mask, ghost_axis
        # Known to hold no example while tracing: left out of the output.
        self.empty = values.shape[0] == 0
        reduced = reduction_axes(values.shape.rank, tuple(a + lead for a in feature_axes))
        self.axes = tuple(axis for axis in reduced if axis >= lead)
        self.mean, self.variance, self.count = moments(values, self.axes, mask, build, stored=stored)

    def examples(self):
        """Number of examples in this part, as a tensor."""
        shape = tf.shape(self.values)
        return shape[0] * shape[1] if self.ghost_axis else shape[0]

    def broadcast(self, parameter):
        """A per-feature tensor in the input's broadcast shape, for this part."""
        return tf.expand_dims(parameter, 0) if self.ghost_axis else parameter

    def per_ghost(self, value, feature_shape):
        """`[ghost batches, *feature_shape]` from a statistic in broadcast shape."""
        value = tf.broadcast_to(value, tf.shape(self.mean))
        ghosts = tf.shape(self.values)[:1] if self.ghost_axis else [1]
        return tf.reshape(value, tf.concat([ghosts, feature_shape], axis=0))

    def statistics(self, feature_shape):
        """This part's statistics per feature (a part that is the whole batch)."""
        count = tf.broadcast_to(self.count, tf.shape(self.mean))
        values = {"mean": self.mean, "variance": self.variance, "count": count}
        return {name: tf.reshape(value, feature_shape) for name, value in values.items()}

    def corrections(self, reference, epsilon):
        """Renormalisation's `(r, d)` for this part's statistics, or `(None, None)`."""
        if reference is None:
            return None, None
        usable = statistics_are_usable(self.mean, self.variance, self.count)
        dtype = self.values.dtype
        return renorm_corrections(
            self.mean, self.variance,
            self.broadcast(reference["renorm_mean"]), self.broadcast(reference["renorm_stddev"]),
            tf.broadcast_to(usable, tf.shape(self.mean)),
            tf.cast(reference["r_max"], dtype), tf.cast(reference["d_max"], dtype), epsilon,
        )


def _feature_shape(x, feature_axes):
    static = [x.shape[axis] for axis in feature_axes]
    return static if None not in static else tf.gather(tf.shape(x), list(feature_axes))


def _accepts_fused_training(x, gamma, beta, mask=None, reference=None, shift=None, state=None, **options):
    del gamma, beta, shift, state  # `normalize_batch`'s signature
    if reference is not None or options.get("virtual_batch_size") or options.get("all_reduce"):
        return False
    feature_axes, epsilon = options["feature_axes"], options["epsilon"]
    return fused_op.accepts_training(x, mask, feature_axes=feature_axes, epsilon=epsilon)


def _fused_training(
    x, gamma, beta, mask=None, reference=None, shift=None, state=None, *, epsilon, activation=None,
    momentum=None, **_,
):
    del mask, reference, shift  # none: `_accepts_fused_training`
    y, statistics = fused_op.training_step(x, gamma, beta, epsilon=epsilon, activation=activation)
    if state is None:
        return y, statistics
    return y, updated_state(statistics, state, momentum=momentum, epsilon=epsilon)


def updated_state(statistics, state, *, momentum, epsilon, renorm_momentum=None, moving_statistics="batch",
                  all_reduce=None):
    """`state` (per-feature moving statistics: `moving_mean`, `moving_variance`, and with
    `renorm_momentum` renorm's three more) after one batch of `normalize_batch`'s `statistics`:
    ghost batches' by the `moving_statistics` rule, over the global batch with `all_reduce`. The
    moving averages never carry a gradient, and keep their value for a feature whose batch had no
    element or a non-finite statistic."""
    if "ghost_variance" in statistics:
        moving = moving_statistics_of(statistics, moving_statistics, state["moving_mean"], all_reduce)
    else:
        moving = statistics["mean"], statistics["variance"], statistics["count"]
    mean, variance, count = moving
    mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
    usable = statistics_are_usable(mean, variance, count)
    if renorm_momentum is None:
        return updated_moving_statistics(state, mean, variance, usable, momentum=momentum)
    return updated_renorm_statistics(
        state, mean, variance, usable, momentum=momentum, renorm_momentum=renorm_momentum, epsilon=epsilon
    )


@kernel(fused=FusedForm("training", _accepts_fused_training, _fused_training))
def normalize_batch(
    x, gamma, beta, mask=None, reference=None, shift=None, state=None, *, build, epsilon, feature_axes,
    virtual_batch_size=None, all_reduce=None, activation=None, momentum=None, renorm_momentum=None,
    moving_statistics="batch",
):
    """Normalises `x` with its batch statistics, corrected toward `reference` if given: the router's
    kernel of `train_step`, whose arguments of the same names it takes (`all_reduce` only without
    ghost batches; `build`: the route's `Build`, see `build.py`).

    Args (besides `train_step`'s):
      reference: None, or for batch renormalisation a dict of per-feature `renorm_mean`,
        `renorm_stddev` and scalar `r_max`, `d_max`.
      shift: with `all_reduce`, the per-feature moving mean (identical on every replica)
        about which the replicas' moments are combined.
      state: None, or `train_step`'s: then the moving statistics are updated here
        (`updated_state`, with `momentum`, `renorm_momentum`, `moving_statistics`), inside the
        kernel's programs, and returned instead of the batch statistics.

    Returns:
      `(y, statistics)`: the output (shape and dtype of `x`), and the whole local batch's
      per-feature `mean`, `variance` and `count` (global with `all_reduce`), plus
      `ghost_variance` with ghost batches, without gradient; or with `state`, `(y, new_state)`.
    """
    rank = x.shape.rank
    if mask is not None:
        mask = mask_to_broadcast(mask, rank, feature_axes)
    feature_shape = _feature_shape(x, feature_axes)
    gamma, beta = affine_parameters(x, gamma, beta, feature_axes, feature_shape)
    if reference is not None:
        reference = dict(reference)
        for name in ("renorm_mean", "renorm_stddev"):
            reference[name] = to_broadcast(reference[name], rank, feature_axes)
    if virtual_batch_size is None:
        parts = [Part(x, mask, feature_axes, False, build, stored=True)]
        if all_reduce is not None:
            whole = parts[0]
            statistics = (whole.mean, whole.variance, whole.count)
            whole.mean, whole.variance, whole.count = combine_moments(*statistics, shift, all_reduce)
    else:
        masks = (None, None) if mask is None else ghost_parts(mask, virtual_batch_size)
        full, remainder = ghost_parts(x, virtual_batch_size)
        # A slice of the input is summed in blocks, never copied out for a product; the full ghost
        # batches are the whole input when nothing remains (known while tracing).
        stored = (remainder.shape[0] == 0, False)
        pieces = zip((full, remainder), masks, (True, False), stored)
        parts = [
            Part(values, part_mask, feature_axes, ghost, build, stored=whole)
            for values, part_mask, ghost, whole in pieces
        ]
    outputs = []
    # Parts known to be empty are left out (no concatenation when v divides a
    # known batch size); an empty batch keeps its (empty) remainder.
    for part in [part for part in parts if not part.empty] or parts[-1:]:
        r, d = part.corrections(reference, epsilon)
        y = normalize_with_batch_statistics(
            part.values, part.broadcast(gamma), part.broadcast(beta),
            part.mean, part.variance, part.count, epsilon=epsilon, axes=part.axes, build=build,
            mask=part.mask, r=r, d=d, all_reduce=all_reduce, activation=activation,
        )
        if virtual_batch_size is not None:
            # Back to examples along axis 0 (the row count given: -1 is ambiguous when empty).
            y = tf.reshape(y, tf.concat([[part.examples()], tf.shape(x)[1:]], axis=0))
        outputs.append(y)
    y = outputs[0] if len(outputs) == 1 else tf.concat(outputs, axis=0)
    y.set_shape(x.shape)
    ghost = virtual_batch_size is not None
    statistics = combine_ghosts(parts, feature_shape) if ghost else parts[0].statistics(feature_shape)
    if state is None:
        return y, statistics
    return y, updated_state(
        statistics, state, momentum=momentum, epsilon=epsilon, renorm_momentum=renorm_momentum,
        moving_statistics=moving_statistics,
    )


def train_step(
    x, gamma, beta, state, mask=None, limits=None, *, momentum, epsilon, feature_axes,
    renorm_momentum=None, virtual_batch_size=None, moving_statistics="batch", all_reduce=None,
    activation=None, jit_compile=True, shape_use=None,
):
    """One training step of batch normalisation or renormalisation.

    Args:
      x: float tensor of rank 2 to 5 (float32 or float64), batch axis 0.
      gamma, beta: per-feature tensors, or None for no scale / no offset.
      state: dict of per-feature moving statistics: `moving_mean` and
        `moving_variance`, and for renormalisation `moving_stddev`,
        `renorm_mean` and `renorm_stddev`.
      mask: optional boolean tensor of `x`'s shape without the feature axes.
      limits: None for batch norm, or `(r_max, d_max)` scalar tensors for
        batch renormalisation (tensors: a schedule does not retrace).
      momentum, epsilon: Python floats; `renorm_momentum` with `limits`.
      feature_axes: sorted tuple of non-negative feature axes.
      virtual_batch_size: None, or examples per ghost batch.
      moving_statistics: with ghost batches, "batch" or "ghost_mean"
        (`ghost_batch_norm.py`).
      all_reduce: None, or a callable summing a list of tensors over
        replicas: global statistics (for ghost batches, the moving ones).
      activation: None, or the name of a fused activation.
      jit_compile, shape_use: the layer's flag and its `warmup.ShapeUse`.

    Returns:
      `(y, new_state)`, `new_state` with the keys of `state`. The moving
      averages follow `moving * momentum + batch * (1 - momentum)` with the
      biased batch variance, and keep their value for a feature whose batch
      had no element or a non-finite statistic.
    """
    reference = None
    if limits is not None:
        reference = {name: state[name] for name in ("renorm_mean", "renorm_stddev")}
        reference.update(r_max=limits[0], d_max=limits[1])
    # Ghost batches never span replicas: only their moving statistics are global, combined in
    # the caller's graph (collectives run there); otherwise the kernel updates them itself, so
    # a program route keeps the update inside its programs.
    ghost = virtual_batch_size is not None
    collective = None if ghost else all_reduce
    global_moving = ghost and all_reduce is not None
    shift = None if collective is None else state["moving_mean"]
    renorm_momentum = None if limits is None else renorm_momentum
    options = dict(
        momentum=momentum, epsilon=epsilon, renorm_momentum=renorm_momentum,
        moving_statistics=moving_statistics,
    )
    y, result = normalize_batch(
        x, gamma, beta, mask, reference, shift, None if global_moving else state, feature_axes=feature_axes,
        virtual_batch_size=virtual_batch_size, all_reduce=collective, activation=activation,
        jit_compile=jit_compile, shape_use=shape_use, **options,
    )
    new_state = updated_state(result, state, all_reduce=all_reduce, **options) if global_moving else result
    return y, new_state
