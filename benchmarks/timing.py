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
