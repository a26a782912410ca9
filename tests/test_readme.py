"""The README and the docs/*.md pages: their code runs and does what they say, their links resolve.

Every ```python block of a page runs, in order, in one namespace per page, as a
reader would run them, in a fresh working directory (examples may write files,
e.g. a SavedModel). A block that cannot run here is marked in the Markdown with
a visible `<!-- not executed: reason -->` comment right before it; a marker
without a reason fails. A line `print(...)  # text` claims that the page prints
`text`, and the claims must be printed in that order.
"""

import contextlib
import dataclasses
import functools
import io
import os
import re
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from tools import quickstart_from_wheel

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md"))

FENCE = re.compile(r"^ *(```+|~~~+)\s*(\S*)")
NOT_EXECUTED = re.compile(r"^<!--\s*not executed\b:?(.*?)-->\s*$")
CLAIM = re.compile(r"^\s*print\(.*\)  # (.+?)\s*$")


@dataclasses.dataclass
class Block:
    """One fenced code block: its language, code, first code line (1-based) and skip reason."""

    language: str
    code: str
    line: int
    not_executed: str | None


def fenced_blocks(text):
    """The fenced code blocks of Markdown `text`, with any `<!-- not executed: ... -->` marker.

    A marker applies to the block that follows it with only blank lines in
    between; its reason is what follows the colon (empty if there is none).
    Raises `ValueError` for a marker followed by no block, or an unclosed fence.
    """
    lines = text.splitlines()
    blocks, marker, index = [], None, 0
    while index < len(lines):
        line = lines[index]
        opening = FENCE.match(line)
        if opening is None:
            found = NOT_EXECUTED.match(line.strip())
            if found is not None:
                marker = (index + 1, found.group(1).strip())
            elif line.strip() and marker is not None:
                raise ValueError(f"line {marker[0]}: a `not executed` marker not followed by a code block")
            index += 1
            continue
        fence, language = opening.groups()
        end = next(
            (i for i in range(index + 1, len(lines)) if lines[i].strip().startswith(fence[0] * len(fence))), None
        )
        if end is None:
            raise ValueError(f"line {index + 1}: a code block that is never closed")
        code = "".join(f"{code_line}\n" for code_line in lines[index + 1 : end])
        blocks.append(Block(language, code, index + 2, None if marker is None else marker[1]))
        marker, index = None, end + 1
    if marker is not None:
        raise ValueError(f"line {marker[0]}: a `not executed` marker not followed by a code block")
    return blocks


def python_blocks(page):
    return [block for block in fenced_blocks((ROOT / page).read_text()) if block.language == "python"]


def run_page(page, directory):
    """Runs the page's python blocks in order in one namespace, in `directory`.

    Returns the namespace and the lines printed. The XLA policy is restored
    afterwards, whatever the page set.
    """
    namespace, printed, previous = {}, io.StringIO(), os.getcwd()
    os.chdir(directory)
    try:
        with kerasbn.kernels.xla_policy(), contextlib.redirect_stdout(printed):
            for block in python_blocks(page):
                if block.not_executed is None:
                    # Padded so that tracebacks give the line number in the page.
                    exec(compile("\n" * (block.line - 1) + block.code, str(ROOT / page), "exec"), namespace)
    finally:
        os.chdir(previous)
    return namespace, printed.getvalue().splitlines()


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """`executed(page)`: the page's namespace and printed lines, run once per test module."""
    runs = {}

    def run(page):
        if page not in runs:
            directory = tmp_path_factory.mktemp(re.sub(r"\W", "_", page))
            runs[page] = run_page(page, directory)
        return runs[page]

    return run


# -- every page -------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_runs_in_order_and_prints_what_it_claims(page, executed):
    _, printed = executed(page)
    claims = [
        found.group(1)
        for block in python_blocks(page)
        if block.not_executed is None
        for found in map(CLAIM.match, block.code.splitlines())
        if found is not None
    ]
    remaining = iter(printed)
    for claim in claims:
        assert any(line.strip() == claim for line in remaining), f"{page} does not print {claim!r} (in order)"


def test_blocks_not_executed_say_why_and_no_python_block_hides_under_another_name():
    for page in PAGES:
        for block in fenced_blocks((ROOT / page).read_text()):
            if block.not_executed is not None:
                assert block.not_executed, f"{page}:{block.line}: `<!-- not executed: reason -->` needs a reason"
                assert block.language == "python", f"{page}:{block.line}: only python blocks are executed anyway"
            assert block.language == "python" or not block.language.startswith("py"), (
                f"{page}:{block.line}: write ```python so that the block is executed"
            )


def test_the_block_parser_finds_markers_and_rejects_stray_ones():
    text = "a\n\n<!-- not executed: needs TF Serving -->\n\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    first, second = fenced_blocks(text)
    assert (first.code, first.line, first.not_executed) == ("x = 1\n", 6, "needs TF Serving")
    assert (second.code, second.not_executed) == ("y = 2\n", None)
    assert fenced_blocks("<!-- not executed -->\n```python\nx\n```\n")[0].not_executed == ""
    with pytest.raises(ValueError, match="not followed by a code block"):
        fenced_blocks("<!-- not executed: why -->\n\ntext\n\n```python\nx\n```\n")
    with pytest.raises(ValueError, match="never closed"):
        fenced_blocks("```python\nx = 1\n")


def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def without_code(text):
    return re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)


def links(page):
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", without_code((ROOT / page).read_text()))


def test_every_relative_link_points_to_an_existing_file_and_heading():
    for page in PAGES:
        relative = [target for target in links(page) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]
        for target in relative:
            path, _, anchor = target.partition("#")
            file = (ROOT / page).parent / path if path else ROOT / page
            assert file.exists(), f"{page} links to {target}: no such file"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", without_code(file.read_text()), flags=re.M)
                assert anchor in map(github_anchor, headings), f"{page} links to {target}: no such heading"


def test_readme_lists_every_public_name_with_a_link_to_its_documentation():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What is in the package\n", 1)[1].split("\n## ", 1)[0]
    rows = {
        found.group(1): found.group(2)
        for found in re.finditer(r"^\| `([\w.]+)` \|.*\| \[[^\]]+\]\(([^)]+)\) \|$", section, flags=re.M)
    }
    public = {f"kerasbn.{name}" for name in kerasbn.__all__}
    public |= {f"kerasbn.kernels.{name}" for name in ("set_xla_policy", "get_xla_policy", "xla_policy", "jit_disabled", "Policy", "explain")}
    assert set(rows) == public
    for name in rows:
        assert functools.reduce(getattr, name.split(".")[1:], kerasbn) is not None, name


# -- what particular examples claim --------------------------------------------------


def test_quickstart_builds_a_model_with_our_layer():
    namespace = {}
    exec(quickstart_from_wheel.quickstart_code((ROOT / "README.md").read_text()), namespace)
    model = namespace["model"]
    assert any(isinstance(layer, kerasbn.BatchNorm) for layer in model.layers)
    assert model.output.shape == (None, 10)


def test_readme_conversion_example_converts_fuses_and_goes_back_to_keras(executed, rng):
    namespace, _ = executed("README.md")
    model, fast, plain = namespace["model"], namespace["fast"], namespace["plain"]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in fast.layers)
    assert not any(isinstance(layer, keras.layers.ReLU) for layer in fast.layers)  # all fused
    fused = [layer for layer in fast.layers if isinstance(layer, kerasbn.BatchNorm)]
    assert {layer.activation for layer in fused} == {"relu6", None}
    relu6 = [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
    assert len(fast.layers) == len(model.layers) - len(relu6)
    # Our layers' outputs against Keras' are tested on this model in
    # test_conversion_applications.py; here, Keras' layers again, same outputs.
    assert not any(isinstance(layer, (kerasbn.BatchNorm, kerasbn.GroupNorm)) for layer in plain.layers)
    assert len(plain.layers) == len(model.layers)
    x = rng.normal(size=(2, 96, 96, 3)).astype("float32")
    np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_conversion_doc_examples_build_what_they_describe(executed):
    namespace, _ = executed("docs/conversion.md")
    model, converted = namespace["model"], namespace["converted"]
    assert [type(layer).__name__ for layer in converted.layers] == [
        "InputLayer", "Conv2D", "BatchNorm", "ReLU", "Conv2D", "BatchNorm", "Activation",
        "GlobalAveragePooling2D", "Dense",
    ]
    assert converted.get_layer("bn2").momentum == 0.9
    backbone = namespace["converted_classifier"].layers[1]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in backbone.layers)
    assert isinstance(namespace["renormalized"].get_layer("bn1"), kerasbn.BatchRenorm)
    assert namespace["renormalized"].get_layer("bn1").r_max == 2.0
    assert [type(layer).__name__ for layer in namespace["plain"].layers] == [
        "InputLayer", "Conv2D", "BatchNormalization", "Activation", "Conv2D", "BatchNormalization",
        "Activation", "GlobalAveragePooling2D", "Dense",
    ]
    assert model.get_layer("bn1").__class__ is keras.layers.BatchNormalization  # left alone


def test_renorm_schedule_example_gives_the_papers_schedule(executed):
    namespace, _ = executed("docs/small-batches.md")
    layer = namespace["layer"]
    assert isinstance(layer, kerasbn.BatchRenorm)
    assert [float(layer.r_max(s)) for s in (5000, 40000)] == [1.0, 3.0]
    assert [float(layer.d_max(s)) for s in (5000, 25000)] == [0.0, 5.0]


def test_ghost_batch_norm_example_normalizes_each_ghost_batch(executed, rng):
    namespace, _ = executed("docs/ghost-batch-norm.md")
    model = namespace["model"]
    (layer,) = [layer for layer in model.layers if isinstance(layer, kerasbn.BatchNorm)]
    assert layer.virtual_batch_size == 16 and layer.activation == "relu"
    conv = model.layers[model.layers.index(layer) - 1]
    probe = keras.Model(model.inputs, [conv.output, layer.output])
    # 40 examples: ghost batches of 16, 16 and 8, each with its own statistics.
    features, normalized = probe(rng.normal(size=(40, 32, 32, 3)).astype("float32"), training=True)
    features = features.numpy().astype(np.float64)
    for part in (slice(0, 16), slice(16, 32), slice(32, 40)):
        block = features[part]
        mean, var = block.mean(axis=(0, 1, 2)), block.var(axis=(0, 1, 2))
        expected = np.maximum((block - mean) / np.sqrt(var + 1e-3), 0.0)
        np.testing.assert_allclose(normalized.numpy()[part], expected, atol=1e-4)


def test_recalibration_example_takes_one_pass_per_block_over_the_steps_asked(executed):
    namespace, _ = executed("docs/recalibration.md")
    reports = namespace["reports"]
    assert [(report.name, report.level) for report in reports] == [("bn1", 0), ("bn2", 1)]
    # 200 batches of 16 images; bn1 sees 14x14 positions per image, bn2 12x12.
    assert [report.count for report in reports] == [200 * 16 * 14 * 14, 200 * 16 * 12 * 12]


def test_serving_example_names_the_signature_after_the_models_input_and_output_layer(executed):
    namespace, _ = executed("docs/serving.md")
    path = Path(namespace["path"])
    assert path.is_absolute() and path.parts[-3:] == ("saved_models", "digits", "1")
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    assert list(signature.structured_input_signature[1]) == ["image"]
    assert list(signature.structured_outputs) == ["digit"]
    assert (path.parent / "2" / "saved_model.pb").exists()  # Keras' own model.export
