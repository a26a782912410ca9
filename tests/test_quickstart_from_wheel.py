"""tools/quickstart_from_wheel.py takes the README's quickstart, and only it."""

from pathlib import Path

import pytest

from tools import quickstart_from_wheel

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_takes_the_python_block_importing_kerasbn_under_the_quickstart_heading():
    code = quickstart_from_wheel.quickstart_code(README)
    section = README.split("## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    assert f"```python\n{code}```" in section
    assert "import kerasbn" in code


def test_ignores_blocks_outside_the_quickstart_section():
    readme = "## Other\n\n```python\nimport kerasbn  # elsewhere\n```\n\n## Quickstart\n\n```python\nimport kerasbn\n```\n"
    assert quickstart_from_wheel.quickstart_code(readme) == "import kerasbn\n"


@pytest.mark.parametrize(
    "readme, message",
    [
        ("## Usage\n\n```python\nimport kerasbn\n```\n", "no '## Quickstart' section"),
        ("## Quickstart\n\n```python\nimport keras\n```\n", "0 ```python blocks"),
        ("## Quickstart\n\n```python\nimport kerasbn\n```\n```python\nimport kerasbn\n```\n", "2 ```python blocks"),
    ],
)
def test_a_readme_without_exactly_one_quickstart_block_is_a_value_error(readme, message):
    with pytest.raises(ValueError, match=message):
        quickstart_from_wheel.quickstart_code(readme)
