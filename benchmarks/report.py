"""The benchmarks' common ending: print one JSON object and, when asked, write the same text to a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], out: str | Path | None, *, show: bool = True) -> str:
    text = json.dumps(result, indent=2)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    if show:
        print(text)
    return text
