"""Numerically stable batch moments, and the fast sums the kernels reduce with.

The variance takes two passes (mean, then mean squared deviation): the one-pass E[x²] - E[x]²
loses every digit when the mean is large against the spread. `sum_over`, not `tf.reduce_sum`:
XLA's CPU backend does not fuse a long reduction with its elementwise producer (`(x - m)**2`
becomes a temporary as large as `x`), so short blocks are summed first, reading `x` once, and the
partial sums added by a matrix product with ones; built without `block_sums` (no XLA), a sum is one
`tf.reduce_sum`. Why: docs/decisions/007-block-sums-for-xla-cpu.md to 012-plain-graphs-sum-with-reduce-sum.md.
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
    """A [2, length] matrix (`column`: [length, 2]) whose first row (column), ones, alone is used,
    so that the product is matrix-matrix; a literal with zeros when `length` is a Python int
    (docs/decisions/009-two-row-ones-matrix.md)."""
    if isinstance(length, int):
        value = np.zeros((2, length), dtype.as_numpy_dtype)
        value[0] = 1
        return tf.constant(value.T if column else value)
    return tf.ones(tf.stack([length, 2] if column else [2, length]), dtype)


def _group_indicator(groups, blocks, dtype):
    """The `[max(G, 2), G·blocks]` matrix summing each group's `blocks` rows (a zero second row
    when G = 1, as in `_ones`); a literal when the sizes are known while tracing."""
    if isinstance(groups, int) and isinstance(blocks, int):
        value = np.zeros((max(groups, 2), groups * blocks), dtype.as_numpy_dtype)
        for group in range(groups):
            value[group, group * blocks : (group + 1) * blocks] = 1
        return tf.constant(value)
    rows = tf.range(tf.maximum(groups, 2))[:, None]
    owners = tf.range(groups * blocks)[None, :] // tf.maximum(blocks, 1)
    return tf.cast(tf.equal(rows, owners), dtype)


def _ones_product(values, rows):
    """`[..., rows, C]` -> `[..., C]` by one (batched) product with ones. The ones carry the batch
    axis: broadcast in the product, they made XLA transpose `values` into the loop producing it
    (docs/decisions/024-group-norm-on-the-input-layout.md)."""
    ones = _ones(rows, values.dtype)
    if values.shape.rank == 3:
        ones = tf.broadcast_to(ones, tf.stack([tf.shape(values)[0], 2, rows]))
    return tf.matmul(ones, values)[..., 0, :]


def _group_totals(partial, groups, blocks, limit):
    """`[G, blocks, C]` partial sums -> `[G, C]`: one block-diagonal product up to `limit` groups,
    else a batched one; with G unknown, a `tf.cond` (docs/decisions/010-group-sums-block-diagonal.md)."""
    columns = tf.shape(partial)[2]

    def by_block_diagonal():
        flat = tf.reshape(partial, tf.stack([groups * blocks, columns]))
        return tf.matmul(_group_indicator(groups, blocks, partial.dtype), flat)[:groups]

    def batched():
        return _ones_product(partial, blocks)

    if isinstance(groups, int):
        return by_block_diagonal() if groups <= limit else batched()
    return tf.cond(groups <= limit, by_block_diagonal, batched)


def column_sums(values, block, group_matmul_limit, stored=False):
    """`[..., P, C]` -> `[..., C]`: blocks of `block` rows, then the partial sums by a product
    with ones (per group for `[G, P, C]`), and the last P % block rows separately. `stored`:
    `values` is in memory already, not an expression XLA would fuse into the sum: one product
    with ones reads it (docs/decisions/025-sums-at-read-speed.md)."""
    shape = tf.shape(values)
    lead, rows, columns = shape[:-2], _dim(values, -2), shape[-1]
    if stored:
        return _ones_product(values, rows)
    blocks = rows // block
    head = blocks * block
    view = tf.reshape(values[..., :head, :], _concat_shape(lead, blocks, block, columns))
    partial = tf.reduce_sum(view, axis=-2)
    if values.shape.rank == 3:
        total = _group_totals(partial, _dim(values, 0), blocks, group_matmul_limit)
    else:
        total = tf.matmul(_ones(blocks, values.dtype), partial)[..., 0, :]
    return total + tf.reduce_sum(values[..., head:, :], axis=-2)


def row_sums(values, block):
    """Sum over the last axis, `[..., B]` -> `[...]`, the same way as `column_sums`."""
    shape = tf.shape(values)
    lead, length = shape[:-1], _dim(values, -1)
    blocks = length // block
    head = blocks * block
    partial = tf.reduce_sum(tf.reshape(values[..., :head], _concat_shape(lead, blocks, block)), -1)
    # The row count is given, not -1: TensorFlow infers -1 as 1 for an empty `partial` (no block).
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


def sum_over(values, axes, build, block=None, stored=False):
    """`tf.reduce_sum(values, axes, keepdims=True)`, arranged to be fast under XLA; `block`: the
    first stage's length (default `build.block`); `stored`: as `column_sums`'. Layouts (K kept, R
    reduced): [R, K] column sums; [R, K, R] row sums, then column sums; [K, R, K, R] (per sample
    or ghost batch) column sums per sample over [R, K·R], then the trailing R. Others use
    `tf.reduce_sum`."""
    rank = values.shape.rank
    axes = tuple(sorted(a % rank for a in axes))
    kept = [axis for axis in range(rank) if axis not in axes]
    kept_runs = _runs(kept)
    laid_out = kept and axes and (len(kept_runs) == 1 or (len(kept_runs) == 2 and kept[0] == 0))
    if not build.block_sums or not laid_out:
        return tf.reduce_sum(values, axis=axes, keepdims=True)
    block = build.block if block is None else block
    limit = build.group_matmul_limit
    shape = tf.shape(values)
    kept_shape = tf.stack([shape[axis] if axis in kept else 1 for axis in range(rank)])

    def size(first, end):
        return tf.reduce_prod(shape[first:end])

    if len(kept_runs) == 2:
        (_, lead_end), (first, end) = kept_runs
        lead = size(0, lead_end)
        view = tf.reshape(values, tf.stack([lead, size(lead_end, first), size(first, rank)]))
        per_sample = column_sums(view, block, limit, stored)
        if end < rank:
            per_sample = tf.reshape(per_sample, tf.stack([lead, size(first, end), size(end, rank)]))
            per_sample = tf.reduce_sum(per_sample, axis=-1)
        return tf.reshape(per_sample, kept_shape)
    ((first, end),) = kept_runs
    outer, channels = size(0, first), size(first, end)
    if end == rank:
        total = column_sums(tf.reshape(values, tf.stack([outer, channels])), block, limit, stored)
    else:  # channels-first: each channel's contiguous run first, leaving [outer, C]
        per_row = row_sums(tf.reshape(values, tf.stack([outer, channels, size(end, rank)])), block)
        total = column_sums(per_row, block, limit) if first > 0 else tf.reshape(per_row, [-1])
    return tf.reshape(total, kept_shape)


def sum_pair(first, second, axes, build):
    """`(sum_over(first, axes), sum_over(second, axes))` in one pass over both: the pair is packed
    as one complex tensor `first + i·second`, whose real and imaginary parts add exactly as the
    two float sums would (docs/decisions/011-complex-packed-pair-sum.md)."""
    if not axes:  # nothing to sum (group norm of rank 2: one channel per position)
        return first, second
    if first.dtype not in (tf.float32, tf.float64) or not build.block_sums:
        return sum_over(first, axes, build), sum_over(second, axes, build)
    total = sum_over(tf.complex(first, second), axes, build, build.two_input_block)
    return tf.math.real(total), tf.math.imag(total)


def element_count(x, axes, mask=None):
    """Number of elements each statistic is taken over, keeping dims: the product of the reduced
    dimensions, or with a boolean `mask` broadcastable to `x` the unmasked positions."""
    if mask is None:
        static = [x.shape[axis] for axis in axes]
        if None not in static:  # known while tracing: no ops to compute it
            return tf.constant(float(math.prod(static)), x.dtype)
        return tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), list(axes))), x.dtype)
    # Reduced axes count at x's size (a mask of size 1 there stands for all of it: group norm's
    # channels within a group); kept axes stay as in the mask, so nothing broadcasts over them.
    reduced = tf.constant([axis in axes for axis in range(x.shape.rank)])
    shape = tf.where(reduced, tf.shape(x), tf.shape(mask))
    return tf.reduce_sum(tf.cast(tf.broadcast_to(mask, shape), x.dtype), axis=axes, keepdims=True)


def known_count(count):
    """The element count as a Python float when known while tracing, else None."""
    value = tf.get_static_value(count)
    return None if value is None or np.ndim(value) != 0 else float(value)


def at_least_one(count):
    """`max(count, 1)`: the divisor of a sum over `count` elements, safe when empty."""
    known = known_count(count)
    return tf.maximum(count, 1.0) if known is None else tf.constant(max(known, 1.0), count.dtype)


def moments(x, axes, mask, build, pool=None, stored=False):
    """`(mean, variance, count)` of `x` over `axes` (kept as size 1), the variance biased. `mask`:
    None or a boolean tensor broadcastable to `x`; False positions never enter the statistics,
    even NaN or inf. `pool`: None, or a callable adding up per-feature sums over the features
    that share one statistic (group norm's channels of a group), which the statistics then are,
    per feature. `stored`: `x` is in memory already, not a slice of another tensor (see
    `column_sums`). With `count` zero, mean and variance are zero, not NaN. Except with
    `build.differentiable` the statistics carry no gradient (the custom gradient accounts for
    them), which also keeps `sum_over`'s reshapes by computed shapes off the backward (XLA would
    recompile them on every call)."""
    x = x if build.differentiable else tf.stop_gradient(x)
    count = element_count(x, axes, mask)
    zeros = None if mask is None else tf.zeros_like(x)
    if mask is None:
        total = sum_over(x, axes, build, stored=stored)
    else:
        total = sum_over(tf.where(mask, x, zeros), axes, build)
    if pool is None:
        pool = lambda values: values  # noqa: E731 (one statistic per feature)
    else:
        count = pool(tf.broadcast_to(count, tf.shape(total)))
    divisor = at_least_one(count)
    mean = pool(total) / divisor
    deviation = tf.square(x - mean)
    deviation = deviation if mask is None else tf.where(mask, deviation, zeros)
    variance = pool(sum_over(deviation, axes, build)) / divisor
    if build.differentiable:
        return mean, variance, count  # the count never depends on x's values
    # Saved by a kernel's forward program for its backward.
    return tuple(build.residual(tf.stop_gradient(t)) for t in (mean, variance, count))
