"""benchmarks/context.py's search: doubling then bisection finds the longest length that fits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def longest_fitting():
    spec = importlib.util.spec_from_file_location("context_bench", ROOT / "benchmarks" / "context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.longest_fitting


@pytest.mark.parametrize("true_limit", [0, 1000, 1024, 1500, 5000, 40000, 131072, 500000])
def test_finds_the_longest_multiple_that_fits_in_few_tries(longest_fitting, true_limit):
    tried = []

    def fits(n: int) -> bool:
        tried.append(n)
        return n <= true_limit

    found = longest_fitting(fits, start=1024, limit=131072, multiple=256)
    if true_limit < 1024:
        assert found == 0
        return
    want = min(true_limit, 131072) // 256 * 256
    assert want - 256 < found <= want or found == min(true_limit, 131072)
    assert fits(found) and (found == 131072 or not fits(found + 256) or found + 256 > true_limit)
    assert len(tried) <= 2 + 8 + 10  # start, doublings up to the limit, bisection steps
