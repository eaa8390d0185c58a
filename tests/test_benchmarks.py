"""The benchmark's FLOP accounting: in-place matmuls count like their out-of-place forms."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measure import count_flops, dense_part_profile  # noqa: E402


def products(in_place: bool) -> None:
    a, b = torch.randn(3, 4, 5), torch.randn(3, 5, 6)
    m, n = torch.randn(4, 5), torch.randn(5, 7)
    if in_place:
        torch.empty(3, 4, 6).baddbmm_(a, b, beta=0.0)
        torch.zeros(4, 7).addmm_(m, n)
    else:
        torch.bmm(a, b)
        torch.mm(m, n)


def test_in_place_matmuls_count_like_out_of_place_ones():
    expected = 2 * 3 * 4 * 5 * 6 + 2 * 4 * 5 * 7
    assert count_flops(lambda: products(False)) == count_flops(lambda: products(True)) == expected
    assert dense_part_profile(lambda: products(False))[0] == dense_part_profile(lambda: products(True))[0] == expected
