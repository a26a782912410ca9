"""The depth of a `BatchNorm` training call in our code (docs/layout.md), guarded: a change that
adds a layer of indirection to the engine has to raise these limits on purpose."""

from tools import frames


def test_inline_route_is_at_most_eight_frames_deep():
    stack = frames.stack(**frames.ROUTES["inline_ops"])
    names = [name for _, _, name in stack]
    assert names[0] == "call" and "normalize_batch" in names
    assert len(stack) <= 8, stack


def test_dispatch_route_adds_only_the_dispatch_program():
    stack = frames.stack(**frames.ROUTES["warmup_dispatch"])
    inline = frames.stack(**frames.ROUTES["inline_ops"])
    names = [name for _, _, name in stack]
    assert names[0] == "call" and "normalize_batch" in names
    assert len(inline) < len(stack) <= 10, stack
