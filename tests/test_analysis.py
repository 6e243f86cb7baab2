"""Analysis: the cosine similarity between two runs' components (Appendix E) against flattened outer products."""

import torch

from aroma_peft.analysis import component_cosines


def test_component_cosines_equal_the_cosines_of_the_flattened_outer_products():
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    a2, b2 = torch.randn(4, 7, generator=g), torch.randn(5, 4, generator=g)
    a2[0], b2[:, 0] = a1[0], -2 * b1[:, 0]  # a component opposite to the first one: cosine -1
    expected = torch.empty(3, 4, dtype=torch.float64)
    for i in range(3):
        for j in range(4):
            u = torch.outer(b1[:, i], a1[i]).flatten().double()
            v = torch.outer(b2[:, j], a2[j]).flatten().double()
            expected[i, j] = u @ v / (u.norm() * v.norm())
    got = component_cosines(a1, b1, a2, b2)
    torch.testing.assert_close(got, expected)
    assert got[0, 0].item() == -1.0 or abs(got[0, 0].item() + 1) < 1e-12


def test_a_zero_component_has_cosine_zero():
    a, b = torch.randn(2, 4), torch.randn(3, 2)
    b[:, 1] = 0
    got = component_cosines(a, b, a, b)
    assert got[1].abs().max() == 0 and got[:, 1].abs().max() == 0 and abs(got[0, 0].item() - 1) < 1e-12
