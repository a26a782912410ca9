"""Numerically stable batch moments, and the fast sums the kernels reduce with.

The variance is computed in two passes, mean first and then the mean squared
deviation from it. The one-pass E[x^2] - E[x]^2 loses every significant digit
when the mean is large against the spread (float32 data at mean 1e4 and unit
variance gives garbage or a negative variance), and is never used here.

Why `sum_over` and not `tf.reduce_sum`: XLA's CPU backend rewrites a long
reduction into a `reduce-window` (windows of 32) followed by a short `reduce`,
and does not fuse an elementwise producer into that `reduce-window`. So
`reduce_sum((x - m)**2)` over a [N, H, W, C] batch first writes `(x - m)**2` to
a temporary as large as `x`, then walks it with a strided window (optimized
HLO: `fusion(subtract, multiply) -> reduce-window -> reduce`). A
reduction over a short axis (16 elements) is left alone, so the elementwise
producer fuses into it and `x` is read once; the 16 times smaller partial sums
are then added by a matrix product with a vector of ones, which XLA hands to
its matmul library. The result is the same sum, added in a different order.
In a graph that TensorFlow runs without XLA (`Build.block_sums` False) these
arrangements are only more ops, each with its own launch cost: there a sum is
one `tf.reduce_sum` (Eigen's, which adds in blocks too). Block sizes come from
the `Policy` through the `Build`. Why and the figures:
docs/decisions/007-block-sums-for-xla-cpu.md to 011-complex-packed-pair-sum.md.
"""

import math

import numpy as np
import tensorflow as tf



def _concat_shape(*parts):
    return tf.concat([tf.reshape(tf.cast(p, tf.int32), [-1]) for p in parts], axis=0)


def _dim(values, axis):
    """A dimension as a Python int when known while tracing, else a tensor."""
    static = values.shape[axis]
    return static if static is not None else tf.shape(values)[axis]


def _ones(length, dtype, column=False):
    """A [2, length] matrix whose first row is ones ([length, 2] and the first
    column with `column=True`): only that row (column) is used.

    Two rows (columns) where one would do: XLA's CPU backend fuses a
    matrix-vector product whose vector is under 16 KiB into its producer as a
    naive loop, which re-reads the matrix once per output column; a
    matrix-matrix product always goes to the matmul library. With a static
    shape the matrix is a literal with zeros in the second row, kept with the
    compiled program: all ones would be turned into a broadcast materialised
    in scratch memory on every call (docs/decisions/009-two-row-ones-matrix.md).
    """
    if isinstance(length, int):
        value = np.zeros((2, length), dtype.as_numpy_dtype)
        value[0] = 1
        return tf.constant(value.T if column else value)
    return tf.ones(tf.stack([length, 2] if column else [2, length]), dtype)


def _group_indicator(groups, blocks, dtype):
    """The `[max(G, 2), G·blocks]` matrix summing each group's `blocks` rows.

    Row g has ones over columns g·blocks to (g + 1)·blocks; a second, zero row
    when G = 1 keeps the product a matrix-matrix one (see `_ones`). A literal
    when the sizes are known while tracing, else built from `tf.range`.
    """
    if isinstance(groups, int) and isinstance(blocks, int):
        value = np.zeros((max(groups, 2), groups * blocks), dtype.as_numpy_dtype)
        for group in range(groups):
            value[group, group * blocks : (group + 1) * blocks] = 1
        return tf.constant(value)
    rows = tf.range(tf.maximum(groups, 2))[:, None]
    owners = tf.range(groups * blocks)[None, :] // tf.maximum(blocks, 1)
    return tf.cast(tf.equal(rows, owners), dtype)


def _group_totals(partial, groups, blocks, limit):
    """`[G, blocks, C]` partial sums -> `[G, C]`, each group's blocks added.

    A batched product with a row of ones per group makes XLA transpose the
    partial sums inside the fused first stage, which then reads the input less
    regularly. Up to `limit` groups (`Policy.group_matmul_limit`), one product
    with a block-diagonal matrix of ones adds them in place instead; it costs
    G times the flops of the plain product, so more groups keep the batched
    product (docs/decisions/010-group-sums-block-diagonal.md). `groups` and `blocks` are Python
    ints when known while tracing; with G unknown the choice is a `tf.cond`
    (XLA, which knows G, keeps one branch).
    """
    columns = tf.shape(partial)[2]

    def by_block_diagonal():
        flat = tf.reshape(partial, tf.stack([groups * blocks, columns]))
        return tf.matmul(_group_indicator(groups, blocks, partial.dtype), flat)[:groups]

    def batched():
        return tf.matmul(_ones(blocks, partial.dtype), partial)[:, 0, :]

    if isinstance(groups, int):
        return by_block_diagonal() if groups <= limit else batched()
    return tf.cond(groups <= limit, by_block_diagonal, batched)


def column_sums(values, block, group_matmul_limit):
    """Sum over the second-to-last axis: `[..., P, C]` -> `[..., C]`.

    Blocks of `block` rows are summed first (XLA fuses the producer of
    `values` into that step), the P // block partial sums are then added by a
    product with a row of ones (per group, for `[G, P, C]`: `_group_totals`),
    and the last P % block rows separately.
    """
    shape = tf.shape(values)
    lead, rows, columns = shape[:-2], _dim(values, -2), shape[-1]
    blocks = rows // block
    head = blocks * block
    partial = tf.reduce_sum(
        tf.reshape(values[..., :head, :], _concat_shape(lead, blocks, block, columns)), axis=-2
    )
    if values.shape.rank == 3:
        total = _group_totals(partial, _dim(values, 0), blocks, group_matmul_limit)
    else:
        total = tf.matmul(_ones(blocks, values.dtype), partial)[..., 0, :]
    return total + tf.reduce_sum(values[..., head:, :], axis=-2)


def row_sums(values, block):
    """Sum over the last axis: `[..., B]` -> `[...]`, the same way as `column_sums`."""
    shape = tf.shape(values)
    lead, length = shape[:-1], _dim(values, -1)
    blocks = length // block
    head = blocks * block
    partial = tf.reduce_sum(
        tf.reshape(values[..., :head], _concat_shape(lead, blocks, block)), axis=-1
    )
    # The row count is given, not inferred with -1: with no block (length
    # under `block`) `partial` is empty, and TensorFlow infers -1 as 1 for an
    # empty tensor, whatever the rows (an empty batch then fails below).
    flat = tf.reshape(partial, tf.stack([tf.reduce_prod(lead), blocks]))
    total = tf.reshape(tf.matmul(flat, _ones(blocks, values.dtype, column=True))[:, 0], lead)
    return total + tf.reduce_sum(values[..., head:], axis=-1)


def _runs(axes):
    """Splits sorted axes into runs of consecutive axes: [(first, end), ...]."""
    runs = []
    for axis in axes:
        if runs and runs[-1][1] == axis:
            runs[-1][1] = axis + 1
        else:
            runs.append([axis, axis + 1])
    return [tuple(run) for run in runs]


def sum_over(values, axes, build, block=None):
    """`tf.reduce_sum(values, axes, keepdims=True)`, arranged to be fast under XLA.

    `block` is the length of the fused first stage (`build.block` by default). Handled
    layouts, after a free reshape (K kept, R reduced, in memory order):

      [R, K]          channels-last: column sums.
      [R, K, R]       channels-first: row sums, then column sums.
      [K, R, K, R]    a per-sample or per-ghost-batch statistic (group
                      norm, ghost batch norm): column sums per sample over
                      [R, K·R], then the short trailing R on the small result.
                      With many samples XLA turns the batched product into
                      one matmul by transposing the partial sums inside the
                      first stage (HLO: reduce -> transpose -> copy in one
                      fusion), which reads x less regularly; up to
                      `build.group_matmul_limit` samples a block-diagonal product
                      avoids that (`_group_totals`).

    Other layouts, and builds without `block_sums`, use `tf.reduce_sum`.
    """
    rank = values.shape.rank
    axes = tuple(sorted(a % rank for a in axes))
    if not build.block_sums:
        return tf.reduce_sum(values, axis=axes, keepdims=True)
    block = build.block if block is None else block
    limit = build.group_matmul_limit
    kept = [axis for axis in range(rank) if axis not in axes]
    kept_runs = _runs(kept)
    if not kept or not axes or len(kept_runs) > 2 or (len(kept_runs) == 2 and kept[0] != 0):
        return tf.reduce_sum(values, axis=axes, keepdims=True)
    shape = tf.shape(values)
    kept_shape = tf.stack([shape[axis] if axis in kept else 1 for axis in range(rank)])

    def size(first, end):
        return tf.reduce_prod(shape[first:end])

    if len(kept_runs) == 2:
        (_, lead_end), (first, end) = kept_runs
        view = tf.reshape(values, tf.stack([size(0, lead_end), size(lead_end, first), size(first, rank)]))
        per_sample = column_sums(view, block, limit)
        if end < rank:
            per_sample = tf.reduce_sum(
                tf.reshape(per_sample, tf.stack([size(0, lead_end), size(first, end), size(end, rank)])),
                axis=-1,
            )
        return tf.reshape(per_sample, kept_shape)
    ((first, end),) = kept_runs
    outer, channels = size(0, first), size(first, end)
    if end == rank:
        total = column_sums(tf.reshape(values, tf.stack([outer, channels])), block, limit)
    else:
        # Channels-first: sum each channel's contiguous run first, leaving
        # [P, C] (P = outer) to sum over P.
        per_row = row_sums(tf.reshape(values, tf.stack([outer, channels, size(end, rank)])), block)
        total = column_sums(per_row, block, limit) if first > 0 else tf.reshape(per_row, [-1])
    return tf.reshape(total, kept_shape)


def sum_pair(first, second, axes, build):
    """`(sum_over(first, axes), sum_over(second, axes))` in one pass.

    The pair is packed as one complex tensor `first + i·second`, so XLA reads
    the inputs of both in a single fused reduction (and one matrix product adds
    the partial sums) instead of two: the backward's Σ dy and Σ dy (x - μ) read
    dy and x once (docs/decisions/011-complex-packed-pair-sum.md). Real and
    imaginary parts are added separately, exactly as the two float sums would be.
    """
    if not axes:  # nothing to sum (group norm of rank 2: one channel per position)
        return first, second
    if first.dtype not in (tf.float32, tf.float64) or not build.block_sums:
        return sum_over(first, axes, build), sum_over(second, axes, build)
    total = sum_over(tf.complex(first, second), axes, build, build.two_input_block)
    return tf.math.real(total), tf.math.imag(total)


def element_count(x, axes, mask=None):
    """Number of elements each statistic is taken over, keeping dims.

    Without a mask this is the product of the reduced dimensions (zero for an
    empty batch). With a boolean `mask` broadcastable to `x` it is the number of
    unmasked positions, per feature position of the mask.
    """
    if mask is None:
        static = [x.shape[axis] for axis in axes]
        if None not in static:  # known while tracing: no ops to compute it
            return tf.constant(float(math.prod(static)), x.dtype)
        dims = tf.gather(tf.shape(x), list(axes))
        return tf.cast(tf.reduce_prod(dims), x.dtype)
    ones = tf.cast(tf.broadcast_to(mask, _mask_shape(x, mask, axes)), x.dtype)
    return tf.reduce_sum(ones, axis=axes, keepdims=True)


def known_count(count):
    """The element count as a Python float when known while tracing, else None."""
    value = tf.get_static_value(count)
    return None if value is None or np.ndim(value) != 0 else float(value)


def at_least_one(count):
    """`max(count, 1)`: the divisor of a sum over `count` elements, safe when empty."""
    known = known_count(count)
    if known is not None:
        return tf.constant(max(known, 1.0), count.dtype)
    return tf.maximum(count, 1.0)


def _mask_shape(x, mask, axes):
    # Every reduced axis counts at x's size (a mask of size 1 there stands for
    # all of it: group norm's channels within a group); kept axes stay as in
    # the mask, so no work is spent broadcasting over the features.
    rank = x.shape.rank
    reduced = tf.constant([axis in axes for axis in range(rank)])
    return tf.where(reduced, tf.shape(x), tf.shape(mask))


def moments(x, axes, mask, build):
    """Mean, biased variance and element count of `x` over `axes`.

    Args:
      x: float tensor.
      axes: tuple of axes to reduce.
      mask: None, or a boolean tensor broadcastable to `x`; False positions
        are excluded. Their values never enter the statistics, even NaN or inf.
      build: the `Build` (block sums, differentiable statistics, residuals).

    Returns:
      `(mean, variance, count)` with reduced axes kept as size 1. Where `count`
      is zero (empty batch, fully masked batch) mean and variance are zero, not
      NaN.

    The statistics carry no gradient (the normalisation's custom gradient
    accounts for them), except with `build.differentiable` (to differentiate
    a gradient, and in calls no tape records). The
    `stop_gradient` on the results also keeps the reshapes inside `sum_over`
    off the backward pass: TensorFlow builds a gradient for every op between
    a function's inputs and outputs, and a gradient of a reshape by a
    computed shape makes the backward of an XLA function need that shape as
    an input, which XLA's constant analysis then traces back to the values of
    `x` (recompiling, and constant-folding the whole step, on every call).
    """
    differentiable = build.differentiable
    if not differentiable:
        x = tf.stop_gradient(x)
    count = element_count(x, axes, mask)
    divisor = at_least_one(count)
    if mask is None:
        mean = sum_over(x, axes, build) / divisor
        deviation = tf.square(x - mean)
    else:
        zeros = tf.zeros_like(x)
        mean = sum_over(tf.where(mask, x, zeros), axes, build) / divisor
        deviation = tf.where(mask, tf.square(x - mean), zeros)
    variance = sum_over(deviation, axes, build) / divisor
    if differentiable:
        return mean, variance, count  # the count never depends on x's values
    # Saved by a kernel's forward program for its backward (see `compile.py`).
    return tuple(build.residual(tf.stop_gradient(t)) for t in (mean, variance, count))
