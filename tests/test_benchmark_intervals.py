"""The benchmarks' ratio intervals and target verdicts, on made-up samples."""

import re

import numpy as np
import pytest

timing = pytest.importorskip("benchmarks.timing")
models = pytest.importorskip("benchmarks.models")


def _case(samples):
    case = timing.Case("made up", fn=None)
    case.samples = list(samples)
    return case


def test_a_constant_ratio_has_a_point_interval():
    ours = np.linspace(0.1, 0.3, 9)
    low, high = timing.ratio_interval(1.5 * ours, ours, paired=True)
    assert low == pytest.approx(1.5) and high == pytest.approx(1.5)
    steady = np.full(9, 0.2)
    assert timing.ratio_interval(1.5 * steady, steady, paired=False) == pytest.approx((1.5, 1.5))


def test_rounds_are_resampled_in_pairs():
    """A slow round slows every case in it: paired, that noise cancels in the ratio."""
    rng = np.random.default_rng(1)
    load = rng.lognormal(sigma=0.5, size=15)  # per-round slowdown, shared by both cases
    ours = 0.2 * load
    paired = timing.ratio_interval(1.3 * ours, ours, paired=True)
    assert paired == pytest.approx((1.3, 1.3))
    unpaired = timing.ratio_interval(1.3 * ours, ours, paired=False)
    assert unpaired[0] < 1.2 and unpaired[1] > 1.4


def test_the_interval_covers_the_true_ratio_about_as_often_as_it_claims():
    rng = np.random.default_rng(2)
    true_ratio, covered, trials = 1.25, 0, 200
    for trial in range(trials):
        ours = 0.1 * rng.lognormal(sigma=0.15, size=12)
        keras = true_ratio * 0.1 * rng.lognormal(sigma=0.15, size=12)
        low, high = timing.ratio_interval(keras, ours, paired=False, seed=trial)
        covered += low <= true_ratio <= high
    assert 0.75 * trials <= covered < trials  # nominal 90%; a point interval would cover none


def test_a_wider_confidence_gives_a_wider_interval():
    rng = np.random.default_rng(3)
    keras, ours = rng.lognormal(size=20), rng.lognormal(size=20)
    narrow = timing.ratio_interval(keras, ours, paired=True, confidence=0.5)
    wide = timing.ratio_interval(keras, ours, paired=True, confidence=0.99)
    assert wide[0] < narrow[0] <= narrow[1] < wide[1]


@pytest.mark.parametrize(
    "numerator, denominator, kwargs, named",
    [
        ([], [1.0], {}, "numerator has none"),
        ([1.0], [], {}, "denominator has none"),
        ([1.0], [0.0], {}, "positive and finite"),
        ([1.0], [float("nan")], {}, "positive and finite"),
        ([1.0, 2.0], [1.0], {"paired": True}, "`paired`"),
        ([1.0], [1.0], {"confidence": 1.0}, "`confidence`"),
        ([1.0], [1.0], {"resamples": 0}, "`resamples`"),
    ],
)
def test_bad_arguments_are_named(numerator, denominator, kwargs, named):
    kwargs = {"paired": False, **kwargs}
    with pytest.raises(ValueError, match=named):
        timing.ratio_interval(numerator, denominator, **kwargs)


def test_a_target_is_met_only_when_the_whole_interval_reaches_it():
    rng = np.random.default_rng(4)
    ours = 0.1 * rng.lognormal(sigma=0.02, size=10)
    clearly_faster = _case(1.5 * ours * rng.lognormal(sigma=0.02, size=10))
    assert models.verdict(clearly_faster, _case(ours), 1.3) == "met"
    assert models.verdict(clearly_faster, _case(ours), 1.7) == "NOT met"
    noisy = _case(1.3 * ours * rng.lognormal(sigma=0.3, size=10))
    assert models.verdict(noisy, _case(ours), 1.3) == "within noise"
    text = models.speedup_with_interval(clearly_faster, _case(ours))
    parts = re.fullmatch(r"([\d.]+)× \(([\d.]+)–([\d.]+)\)", text).groups()
    point, low, high = (float(v) for v in parts)
    assert point == pytest.approx(1.5, abs=0.03) and low <= point <= high and high - low < 0.1


def test_too_few_rounds_give_no_interval_and_no_verdict():
    few = models.MIN_ROUNDS_FOR_INTERVAL - 1
    keras_case, ours = _case([0.3] * few), _case([0.1] * few)
    assert models.speedup_with_interval(keras_case, ours) == "3.00×"
    assert models.verdict(keras_case, ours, 1.3) == f"not judged: {few} rounds"


def test_bootstrap_resamples_the_rounds_of_every_series_together():
    """A fraction of per-round sums: shared load cancels, as for a paired ratio."""
    rng = np.random.default_rng(5)
    load = rng.lognormal(sigma=0.4, size=16)
    activation, keras = 2.0 * load, 5.0 * load
    ours = activation + 0.4 * (keras - activation)

    def fraction(k, o, a):
        return (np.median(o) - np.median(a)) / (np.median(k) - np.median(a))

    low, high = timing.bootstrap_interval(fraction, keras, ours, activation)
    assert low == pytest.approx(0.4) and high == pytest.approx(0.4)
    noisy = ours * rng.lognormal(sigma=0.2, size=16)
    low, high = timing.bootstrap_interval(fraction, keras, noisy, activation)
    assert low < fraction(keras, noisy, activation) < high and high - low > 0.05


@pytest.mark.parametrize(
    "series, kwargs, named",
    [
        ((), {}, "at least one series"),
        (([1.0, 2.0], [1.0]), {}, "same length"),
        (([1.0], []), {}, "series 1 has none"),
        (([], [1.0]), {}, "series 0 has none"),
        (([[1.0, 2.0]],), {}, "one-dimensional"),
        (([1.0], [-1.0]), {}, "positive and finite"),
        (([1.0],), {"confidence": 0.0}, "`confidence`"),
        (([1.0],), {"resamples": 0}, "`resamples`"),
        (([1.0],), {"resamples": 2.5}, "`resamples`"),
    ],
)
def test_bootstrap_refuses_bad_series_by_name(series, kwargs, named):
    with pytest.raises(ValueError, match=named):
        timing.bootstrap_interval(lambda *s: 1.0, *series, **kwargs)


def test_bootstrap_refuses_a_statistic_not_finite_on_some_resample():
    with pytest.raises(ValueError, match="not finite on 2000 of 2000"):
        timing.bootstrap_interval(lambda s: float("nan"), [1.0, 2.0])

    def inverse_spread(s):
        return 1.0 / (np.max(s) - np.min(s))  # infinite when a resample repeats one round

    with pytest.raises(ValueError, match="not finite on"):
        timing.bootstrap_interval(inverse_spread, [1.0, 2.0, 3.0])


def test_block_makes_no_op_for_cpu_tensors_and_skips_plain_values(monkeypatch):
    import tensorflow as tf

    def no_op(*args, **kwargs):
        raise AssertionError("block ran an op on a CPU result")

    dense = tf.ones([64, 64])
    sparse = tf.sparse.from_dense(tf.eye(3))
    ragged = tf.ragged.constant([[1.0], [2.0, 3.0]])
    monkeypatch.setattr(tf, "reshape", no_op)
    timing.block([dense, None, 3.0, (tf.constant(2.0), np.zeros(2)), sparse, ragged])
