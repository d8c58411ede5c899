"""``python tests/batch/driver.py batch ...``: the CLI with the faulty strategies registered (for subprocess tests)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import batch_faulty  # noqa: E402

from janus_decoding.cli import main  # noqa: E402

if __name__ == "__main__":
    batch_faulty.install()
    main(prog_name="janus-decode")
