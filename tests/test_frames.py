"""The depth of a `BatchNorm` training call in our code (docs/layout.md), guarded: a change that
adds a layer of indirection to the engine has to raise these limits on purpose."""

from tools import frames


def _stack_on(route):
    """The measured stack on `route`, checked to be that route's, from `call` to the kernel."""
    measured_route, stack = frames.stack(**frames.ROUTES[route])
    names = [name for _, _, name in stack]
    assert measured_route == route
    assert names[0] == "call" and "normalize_batch" in names
    return stack


def test_inline_route_is_at_most_eight_frames_deep():
    stack = _stack_on("inline_ops")
    assert len(stack) <= 8, stack


def test_dispatch_route_adds_only_the_dispatch_program():
    stack = _stack_on("warmup_dispatch")
    assert len(_stack_on("inline_ops")) < len(stack) <= 10, stack


def test_a_second_measurement_in_the_same_process_traces_again():
    """The kernels' programs are cached per signature: each measurement uses a fresh one."""
    first = frames.stack(**frames.ROUTES["warmup_dispatch"])
    assert frames.stack(**frames.ROUTES["warmup_dispatch"])[1] == first[1]
