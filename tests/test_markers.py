"""Tests that need CUDA carry @pytest.mark.gpu (tests/conftest.py skips them without it), so `-m gpu`
selects all of them; none hides behind a skipif of its own."""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CUDA_SKIP = re.compile(r"skipif\(\s*not\s+torch\.cuda\.is_available\(\)")


def test_cuda_only_tests_use_the_gpu_marker():
    offenders = [f"{p.relative_to(TESTS.parent)}:{n}" for p in sorted(TESTS.rglob("*.py")) if p != Path(__file__)
                 for n, line in enumerate(p.read_text().splitlines(), 1) if CUDA_SKIP.search(line)]
    assert not offenders, ("mark CUDA-only tests @pytest.mark.gpu (skipped without CUDA by tests/conftest.py) instead "
                           f"of skipif(not torch.cuda.is_available()): {offenders}")

