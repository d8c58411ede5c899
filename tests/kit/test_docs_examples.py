"""docs/writing-a-strategy.md stays true: its ```python blocks run, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing-a-strategy.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_blocks_exist():
    assert len(BLOCK.findall(DOC.read_text())) >= 5


def test_python_blocks_run_in_order():
    namespace: dict = {"__name__": "writing_a_strategy"}
    for i, block in enumerate(BLOCK.findall(DOC.read_text())):
        exec(compile(block, f"{DOC.name}[python block {i}]", "exec"), namespace)
