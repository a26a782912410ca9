"""The route table: `kernels.choose_route` as a pure function, one row per route,
and `kernels.explain` on real layers; the policy's per-thread blocks.

The table's rows are docs/layout.md's. Each row starts from a plain training
call (a tape records it, in a graph, 2^21 elements, jit on, oneDNN off) and
changes the facts that select its route.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from kerasbn import kernels
from kerasbn.kernels import tf_internals

TRAINING_CALL = kernels.CallFacts(
    eager=False,
    in_xla_caller=False,
    forward_accumulator=False,
    gradient_recorded=True,
    static_elements=1 << 21,
    strategy=False,
    collective=False,
    fused_op=None,
    jit_compile=True,
    policy=kernels.Policy(),
    platform="cpu",
)
UNTAPED = dict(gradient_recorded=False)
SMALL = dict(static_elements=1 << 10)
FUSED_TRAINING = dict(platform="cpu-onednn", fused_op="training", static_elements=96 * 1024)

ROUTE_TABLE = [
    # (route, the facts that select it)
    ("forward_mode", dict(forward_accumulator=True)),
    ("eager_program", dict(UNTAPED, eager=True)),
    ("xla_caller_ops", dict(UNTAPED, in_xla_caller=True)),
    ("graph_ops", UNTAPED),
    ("graph_ops", dict(UNTAPED, eager=True, collective=True)),
    ("fused_op", dict(UNTAPED, fused_op="inference")),
    ("fused_op", FUSED_TRAINING),
    ("xla_caller_programs", dict(in_xla_caller=True)),
    ("inline_ops", dict(collective=True)),
    ("inline_ops", dict(collective=True, in_xla_caller=True)),
    ("inline_ops", SMALL),
    ("plain_programs", dict(SMALL, eager=True)),
    ("plain_programs", dict(SMALL, strategy=True)),
    ("plain_programs", dict(jit_compile=False)),
    ("plain_programs", dict(policy=kernels.Policy(jit=False))),
    ("warmup_dispatch", {}),
    ("warmup_dispatch", dict(static_elements=None)),
    ("warmup_dispatch", dict(platform="gpu")),
]


@pytest.mark.parametrize("expected, changes", ROUTE_TABLE)
def test_route_table(expected, changes):
    route, reason = kernels.choose_route(dataclasses.replace(TRAINING_CALL, **changes))
    assert route.name == expected
    assert reason and route.description


def test_every_route_has_a_row():
    assert {name for name, _ in ROUTE_TABLE} == {route.name for route in kernels.ROUTES}


@pytest.mark.parametrize(
    "changes",
    [
        dict(FUSED_TRAINING, static_elements=96 * 1024 - 1),  # under the oneDNN threshold
        dict(FUSED_TRAINING, platform="cpu"),  # oneDNN off: TensorFlow's op is no faster
        dict(FUSED_TRAINING, platform="gpu"),  # cuDNN transposes NHWC float32: on paper
        dict(FUSED_TRAINING, strategy=True),  # replicas' graphs side by side
        dict(FUSED_TRAINING, eager=True),
        dict(FUSED_TRAINING, in_xla_caller=True),  # XLA fuses our ops with the step
        dict(FUSED_TRAINING, forward_accumulator=True),
    ],
)
def test_fused_training_op_only_where_it_pays(changes):
    route, _ = kernels.choose_route(dataclasses.replace(TRAINING_CALL, **changes))
    assert route.name != "fused_op"


def test_the_fused_threshold_is_the_policys():
    facts = dataclasses.replace(
        TRAINING_CALL, **dict(FUSED_TRAINING, static_elements=1000, policy=kernels.Policy(fused_min_elements=1000))
    )
    assert kernels.choose_route(facts)[0].name == "fused_op"


# -- explain, on layers --------------------------------------------------------------


@pytest.mark.parametrize(
    "make, shape, training, policy, expected",
    [
        (kerasbn.BatchNorm, (8, 4, 4, 16), True, {}, ("inline_ops",)),
        (kerasbn.BatchNorm, (8, 4, 4, 16), True, dict(min_elements=0, platform="cpu"), ("warmup_dispatch",)),
        (kerasbn.BatchNorm, (8, 4, 4, 16), False, {}, ("fused_op",)),
        (kerasbn.BatchNorm, (8, 16), False, {}, ("graph_ops",)),
        (
            kerasbn.BatchNorm,
            (8, 8, 8, 256),
            True,
            dict(platform="cpu-onednn"),
            ("fused_op",),
        ),
        (lambda: kerasbn.BatchNorm(virtual_batch_size=4), (8, 8, 8, 256), True, dict(platform="cpu-onednn"), ("inline_ops",)),
        (kerasbn.BatchRenorm, (8, 4, 4, 16), True, dict(min_elements=0), ("warmup_dispatch",)),
        (lambda: kerasbn.GroupNorm(groups=4), (8, 4, 4, 16), False, {}, ("graph_ops",)),
        (lambda: kerasbn.BatchNorm(jit_compile=False), (8, 4, 4, 16), True, dict(min_elements=0), ("plain_programs",)),
    ],
)
def test_explain_names_the_route_a_layer_takes(make, shape, training, policy, expected):
    layer = make()
    with kernels.xla_policy(**policy):
        explanation = kernels.explain(layer, np.zeros(shape, "float32"), training=training)
    assert explanation.routes == expected
    text = str(explanation)
    assert layer.name in text and expected[0] in text and "because" in text


def test_explain_under_jit_and_jit_disabled():
    layer = kerasbn.BatchNorm()
    x = np.zeros((8, 4, 4, 16), "float32")
    assert kernels.explain(layer, x, jit_compile=True).routes == ("xla_caller_programs",)
    with kernels.xla_policy(min_elements=0), kernels.jit_disabled():
        assert kernels.explain(layer, x).routes == ("plain_programs",)


def test_explain_changes_no_weight():
    layer = kerasbn.BatchNorm()
    layer.build((8, 3))
    before = [w.numpy().copy() for w in layer.weights]
    kernels.explain(layer, np.ones((8, 3), "float32") * 5.0)
    for old, new in zip(before, layer.weights):
        np.testing.assert_array_equal(old, new.numpy())


def test_explain_refuses_non_bool_flags():
    with pytest.raises(TypeError, match="training"):
        kernels.explain(kerasbn.BatchNorm(), np.zeros((2, 3)), training="yes")
    with pytest.raises(TypeError, match="jit_compile"):
        kernels.explain(kerasbn.BatchNorm(), np.zeros((2, 3)), jit_compile=1)


# -- the policy ----------------------------------------------------------------------


def test_policy_blocks_do_not_leak_across_threads():
    """Thread A enters a block, thread B enters another, A leaves, B leaves:
    each saw only its own, and the process default is untouched."""
    default = kernels.get_xla_policy()
    steps = [threading.Event() for _ in range(4)]
    seen = {}

    def thread_a():
        with kernels.xla_policy(warmup_calls=0):
            steps[0].set()
            steps[1].wait(10)
            seen["a"] = kernels.get_xla_policy()
        steps[2].set()

    def thread_b():
        steps[0].wait(10)
        with kernels.xla_policy(max_shapes=3):
            steps[1].set()
            steps[2].wait(10)
            seen["b"] = kernels.get_xla_policy()
        seen["b after"] = kernels.get_xla_policy()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen["a"] == dict(default, warmup_calls=0)
    assert seen["b"] == dict(default, max_shapes=3)
    assert seen["b after"] == default
    assert kernels.get_xla_policy() == default


def _policies_in_replica_threads(strategy, traced):
    """The policy each replica thread of `strategy` sees, and its thread type's name."""
    seen = []

    def replica():
        seen.append((threading.current_thread() is not threading.main_thread(), kernels.get_xla_policy()))
        kernels.set_xla_policy(min_elements=5)  # inside the inherited block, or the default if none
        return tf.constant(0.0)

    run = tf.function(lambda: strategy.run(replica)) if traced else (lambda: strategy.run(replica))
    run()
    return seen


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf.function"])
def test_mirrored_strategy_replica_threads_follow_the_callers_blocks(traced):
    """MirroredStrategy traces each replica in a thread of its own: the blocks of the thread that
    runs the strategy (e.g. around `model.fit`) reach them, and what a replica sets stays its own."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    default = kernels.get_xla_policy()
    with kernels.jit_disabled(), kernels.xla_policy(max_shapes=3):
        seen = _policies_in_replica_threads(strategy, traced)
        assert kernels.get_xla_policy() == dict(default, jit=False, max_shapes=3)
    assert seen and all(other_thread for other_thread, _ in seen)
    assert all(policy == dict(default, jit=False, max_shapes=3) for _, policy in seen)
    assert kernels.get_xla_policy() == default


def test_two_replicas_each_start_from_the_callers_blocks():
    """Two logical CPUs in a fresh process: each replica thread sees the caller's blocks, and
    what one replica sets reaches neither the other nor the caller."""
    worker = pathlib.Path(__file__).parent / "distributed" / "policy_worker.py"
    result = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    default = kernels.Policy()
    replicas = report["replicas"]
    assert sorted(replicas) == ["0", "1"]
    for replica_id, policy in replicas.items():
        assert policy["thread"] != report["caller_thread"]
        expected = (False, 3, 100 + int(replica_id))
        assert (policy["jit"], policy["max_shapes"], policy["min_elements"]) == expected
    assert replicas["0"]["thread"] != replicas["1"]["thread"]
    assert (report["caller"]["jit"], report["caller"]["max_shapes"]) == (False, 3)
    assert report["caller"]["min_elements"] == report["after"]["min_elements"] == default.min_elements
    assert report["after"]["jit"] is True and report["after"]["max_shapes"] == default.max_shapes


def test_what_a_replica_sets_outside_any_block_stays_in_its_thread():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    default = kernels.get_xla_policy()
    seen = _policies_in_replica_threads(strategy, traced=False)  # each replica sets min_elements=5
    assert [policy for _, policy in seen] == [default]
    assert kernels.get_xla_policy() == default


def test_replica_threads_without_the_private_api_start_from_the_default():
    """The documented fallback when TensorFlow's replica-thread hook is gone: the default policy."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    default = kernels.get_xla_policy()
    try:
        with tf_internals.without_private_apis("on_replica_thread_start"), kernels.xla_policy(max_shapes=3):
            seen = _policies_in_replica_threads(strategy, traced=False)
        assert [policy for _, policy in seen] == [default]
    finally:
        kernels.set_xla_policy(min_elements=default["min_elements"])  # the replica set the default


def test_blocks_nest_and_scope_set_xla_policy():
    default = kernels.get_xla_policy()
    with kernels.xla_policy(warmup_calls=2):
        with kernels.xla_policy(max_shapes=1):
            kernels.set_xla_policy(min_elements=7)
            assert kernels.get_xla_policy() == dict(default, warmup_calls=2, max_shapes=1, min_elements=7)
        assert kernels.get_xla_policy() == dict(default, warmup_calls=2)
    assert kernels.get_xla_policy() == default


def test_set_xla_policy_outside_a_block_is_the_process_default():
    default = kernels.get_xla_policy()
    seen = {}
    try:
        kernels.set_xla_policy(warmup_calls=9)
        thread = threading.Thread(target=lambda: seen.update(kernels.get_xla_policy()))
        thread.start()
        thread.join(10)
        assert seen["warmup_calls"] == 9
    finally:
        kernels.set_xla_policy(warmup_calls=default["warmup_calls"])


@pytest.mark.parametrize(
    "fields, error, name",
    [
        (dict(warmup_calls=-1), ValueError, "warmup_calls"),
        (dict(max_shapes=1.5), ValueError, "max_shapes"),
        (dict(fused_min_elements=True), ValueError, "fused_min_elements"),
        (dict(block=0), ValueError, "block"),
        (dict(jit="no"), TypeError, "jit"),
        (dict(platform="tpu"), ValueError, "platform"),
        (dict(warmup=3), TypeError, "warmup"),
    ],
)
def test_bad_policy_values_name_the_field(fields, error, name):
    default = kernels.get_xla_policy()
    with pytest.raises(error, match=name):
        kernels.set_xla_policy(**fields)
    with pytest.raises(error, match=name):
        with kernels.xla_policy(**fields):
            pass
    assert kernels.get_xla_policy() == default
