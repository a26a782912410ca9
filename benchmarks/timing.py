"""Wall-clock timing: warm-up, interleaved repeated runs, medians.

The machine this runs on is shared and noisy, so cases are measured side by
side: after every case has been compiled and warmed up, the runner makes
several rounds over all cases in a shuffled order, timing each call on its own.
A burst of background load then slows every case of that round instead of
whichever case happened to be running, and the median over all rounds is taken
per case. Ratios are computed from medians of the same run.
"""

import random
import statistics
import time

import numpy as np


def block(result):
    """Waits for `result` (a nest of tensors) by copying one element of each to host.

    On CPU a `tf.function` call already returns finished tensors; fetching one
    element is cheap and makes the timing correct on asynchronous devices too.
    """
    import tensorflow as tf

    for tensor in tf.nest.flatten(result):
        if tensor is None:
            continue
        if tensor.shape.rank:
            tensor = tf.reshape(tensor, [-1])[:1]
        np.asarray(tensor)


def time_call(fn):
    """Seconds one call of `fn` takes, including waiting for its result."""
    start = time.perf_counter()
    block(fn())
    return time.perf_counter() - start


class Case:
    """A named zero-argument callable and its measurements (in seconds)."""

    def __init__(self, name, fn, group=None):
        self.name = name
        self.fn = fn
        self.group = group
        self.first_call = None
        self.samples = []

    @property
    def median(self):
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def compile_time(self):
        """First call minus a steady-state call: tracing plus (XLA) compilation."""
        return max(self.first_call - self.median, 0.0)


def ratio_interval(numerator, denominator, *, paired, confidence=0.9, resamples=2000, seed=0):
    """Bootstrap interval of `median(numerator) / median(denominator)`.

    The samples are seconds per call of two cases. `paired=True` says sample
    i of each comes from round i of one `measure(..., calls_per_round=1)`
    (the same stretch of the machine's load): rounds are then resampled as
    pairs. Otherwise each case is resampled on its own. Resampling the two
    medians (not the per-round ratios) keeps the interval about the ratio the
    tables print; with load shared by a round it is on the wide side
    (conservative).

    Returns `(low, high)`, the central `confidence` share of the resampled
    ratios: on these noisy machines a ratio is only ahead of a target when
    `low` is.

    Raises:
      ValueError: a case without samples, a sample that is not a positive
        finite duration, `paired` with different sample counts, `confidence`
        outside (0, 1) or `resamples` below 1.
    """
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    if numerator.size == 0 or denominator.size == 0:
        raise ValueError("ratio_interval: `numerator` and `denominator` need samples.")
    for samples in (numerator, denominator):
        if not (np.isfinite(samples).all() and (samples > 0).all()):
            raise ValueError("ratio_interval: samples are durations, positive and finite.")
    if paired and numerator.size != denominator.size:
        raise ValueError(
            f"ratio_interval: `paired` needs as many samples on each side, got "
            f"{numerator.size} and {denominator.size}."
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"ratio_interval: `confidence` must be in (0, 1), got {confidence!r}.")
    if resamples < 1:
        raise ValueError(f"ratio_interval: `resamples` must be at least 1, got {resamples!r}.")
    rng = np.random.default_rng(seed)
    top = rng.integers(0, numerator.size, size=(resamples, numerator.size))
    if paired:
        bottom = top
    else:
        bottom = rng.integers(0, denominator.size, size=(resamples, denominator.size))
    ratios = np.median(numerator[top], axis=1) / np.median(denominator[bottom], axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return float(low), float(high)


def measure(cases, *, warmup=2, rounds=5, calls_per_round=3, seed=0):
    """Times every case, interleaved; fills `first_call` and `samples` in place.

    Args:
      cases: list of `Case`.
      warmup: untimed calls per case after the first (timed) call.
      rounds: passes over all cases, each in a new random order.
      calls_per_round: timed calls of a case in each pass.
    """
    for case in cases:
        case.first_call = time_call(case.fn)
        for _ in range(warmup):
            block(case.fn())
    order = list(cases)
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for case in order:
            for _ in range(calls_per_round):
                case.samples.append(time_call(case.fn))
    return cases
