"""The depth of a `BatchNorm` training call in our code (docs/layout.md), guarded: a change that
adds a layer of indirection to the engine has to raise these limits on purpose."""

from tools import frames


def test_inline_route_is_at_most_eight_frames_deep():
    route, stack = frames.stack(**frames.ROUTES["inline_ops"])
    names = [name for _, _, name in stack]
    assert route == "inline_ops"
    assert names[0] == "call" and "normalize_batch" in names
    assert len(stack) <= 8, stack


def test_dispatch_route_adds_only_the_dispatch_program():
    route, stack = frames.stack(**frames.ROUTES["warmup_dispatch"])
    names = [name for _, _, name in stack]
    assert route == "warmup_dispatch"
    assert names[0] == "call" and "normalize_batch" in names
    assert len(stack) <= 10, stack


def test_a_second_measurement_in_the_same_process_traces_again():
    """The kernels' programs are cached per signature: each measurement uses a fresh one."""
    first = frames.stack(**frames.ROUTES["warmup_dispatch"])
    assert frames.stack(**frames.ROUTES["warmup_dispatch"])[1] == first[1]
