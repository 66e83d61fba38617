"""The README's Python examples run as written."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    assert len(blocks) >= 3
    try:
        import timm  # noqa: F401
    except Exception:
        pytest.skip("timm unavailable")
    env: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), env)
