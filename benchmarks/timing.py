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
    """Waits for `result` (a nest of tensors) to be computed.

    A tensor in host memory becomes a NumPy view of its buffer (no copy, under
    a microsecond). Elsewhere one element is sliced off and copied to the host,
    which waits for an asynchronous device; that slice is an op of its own
    (0.05-0.3 ms), so on the CPU it would add to every timed call, more to a
    case returning more tensors.
    """
    import tensorflow as tf

    for tensor in tf.nest.flatten(result, expand_composites=True):
        if not tf.is_tensor(tensor):  # None, a Python or NumPy value: already there
            continue
        if tensor.shape.rank and "device:CPU:" not in tensor.device:
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
      ValueError: a case without samples, not one-dimensional or with a
        sample that is not a positive finite duration, `paired` with
        different sample counts, `confidence` outside (0, 1) or `resamples`
        not an int of at least 1.
    """
    numerator, denominator = _durations("ratio_interval", numerator=numerator, denominator=denominator)
    if paired and numerator.size != denominator.size:
        raise ValueError(
            f"ratio_interval: `paired` needs as many samples on each side, got "
            f"{numerator.size} and {denominator.size}."
        )
    _check_bootstrap("ratio_interval", confidence, resamples)
    rng = np.random.default_rng(seed)
    top = rng.integers(0, numerator.size, size=(resamples, numerator.size))
    if paired:
        bottom = top
    else:
        bottom = rng.integers(0, denominator.size, size=(resamples, denominator.size))
    ratios = np.median(numerator[top], axis=1) / np.median(denominator[bottom], axis=1)
    return _central(ratios, confidence)


def bootstrap_interval(statistic, *series, confidence=0.9, resamples=2000, seed=0):
    """Bootstrap interval of `statistic(*series)` with the rounds resampled together.

    Each of `series` holds one duration (seconds) per round of one
    `measure(..., calls_per_round=1)`, or per-round sums of such durations:
    sample i of every series comes from round i, so the rounds are resampled
    as a whole, as `ratio_interval(paired=True)` does for two. `statistic`
    takes as many arrays and returns a float.

    Returns `(low, high)`, the central `confidence` share of the resampled
    statistics.

    Raises:
      ValueError: no series, a series without samples, not one-dimensional
        or with a sample that is not a positive finite duration, series of
        different lengths, `confidence` outside (0, 1), `resamples` not an
        int of at least 1, or a resample where `statistic` is not finite
        (the interval of such a statistic would mean nothing).
    """
    if not series:
        raise ValueError("bootstrap_interval: give at least one series of samples.")
    arrays = _durations("bootstrap_interval", **{f"series {i}": s for i, s in enumerate(series)})
    count = arrays[0].size
    if any(array.size != count for array in arrays):
        raise ValueError(
            f"bootstrap_interval: the series are rounds, resampled together: they need the "
            f"same length, got {sorted(array.size for array in arrays)}."
        )
    _check_bootstrap("bootstrap_interval", confidence, resamples)
    rng = np.random.default_rng(seed)
    rounds = rng.integers(0, count, size=(resamples, count))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.array(
            [statistic(*(array[picked] for array in arrays)) for picked in rounds], dtype=np.float64
        )
    failed = int(np.count_nonzero(~np.isfinite(values)))
    if failed:
        raise ValueError(
            f"bootstrap_interval: `statistic` was not finite on {failed} of {resamples} resamples."
        )
    return _central(values, confidence)


def _durations(caller, **named):
    """The named sample lists as float64 arrays: non-empty, positive and finite."""
    arrays = []
    for name, samples in named.items():
        array = np.asarray(samples, dtype=np.float64)
        if array.ndim != 1:
            raise ValueError(f"{caller}: {name} must be one-dimensional, one sample per round.")
        if array.size == 0:
            names = " and ".join(f"`{n}`" for n in named)
            raise ValueError(f"{caller}: {names} need samples ({name} has none).")
        if not (np.isfinite(array).all() and (array > 0).all()):
            raise ValueError(f"{caller}: samples are durations, positive and finite ({name}).")
        arrays.append(array)
    return arrays


def _check_bootstrap(caller, confidence, resamples):
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"{caller}: `confidence` must be in (0, 1), got {confidence!r}.")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"{caller}: `resamples` must be an int of at least 1, got {resamples!r}.")


def _central(values, confidence):
    """The central `confidence` share of `values`, as `(low, high)`."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
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
