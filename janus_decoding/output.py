"""Writing results: PNGs (temporary file, then rename), contact sheets, manifest lines, safe file names."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from PIL import Image

SLUG_MAX = 48


def slug(text: str) -> str:
    """ASCII-folded, only ``[A-Za-z0-9_-]``, at most 48 characters, never empty, never a path separator or ``..``."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", folded).strip("_-")
    return cleaned[:SLUG_MAX].strip("_-") or "prompt"


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and prove we can write there, before any work is done."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-", delete=True):
            pass
    except OSError as exc:
        raise ValueError(f"output folder {out} is not writable: {exc.strerror or exc}") from None
    return out


def check_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Refuse an unusable output path before any work, without creating anything (a failed run leaves no folder)."""
    out = Path(path)
    if out.exists():
        return ensure_writable_dir(out)
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {out} is not writable: {parent} is not a writable folder")
    return out


TMP_SUFFIX = ".tmp"


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary sibling, fsync, then rename: a crash never leaves a half-written file under the name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_png(image: Image.Image, path: Path) -> None:
    write_atomic(path, lambda handle: image.save(handle, format="PNG"))


def contact_sheet(images: Sequence[Image.Image], columns: int | None = None, pad: int = 4) -> Image.Image:
    """Tile pictures into one grid (the same size each), so a person can look at a prompt's images at once."""
    columns = columns or min(len(images), 4)
    rows = -(-len(images) // columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w + (columns + 1) * pad, rows * h + (rows + 1) * pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        sheet.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet


def token_hash(tokens: Sequence[int]) -> str:
    return hashlib.sha256(",".join(str(int(t)) for t in tokens).encode()).hexdigest()[:16]


def append_manifest(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, flushed and fsynced (written only after every file it names exists)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
