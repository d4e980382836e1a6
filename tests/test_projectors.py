"""Projectors "linear" and "mlp2x_gelu": registry, math, LLaVA parameter names, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmgpt.interfaces import Projector
from mmgpt.projectors import LinearProjector, MLPProjector
from mmgpt.registry import create
from mmgpt.testing import check_entry


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu"])
def test_registered_and_conform(name: str) -> None:
    proj = create("projector", name, in_dim=5, out_dim=7)
    assert isinstance(proj, Projector)
    assert (proj.in_dim, proj.out_dim) == (5, 7)
    assert proj(torch.randn(2, 3, 5)).shape == (2, 3, 7)
    check_entry("projector", name)
    again = create("projector", name, **proj.config_dict())
    again.load_state_dict(proj.state_dict())
    x = torch.randn(4, 5)
    torch.testing.assert_close(again(x), proj(x))


def test_mlp2x_gelu_is_linear_gelu_linear_with_llava_names() -> None:
    proj = MLPProjector(in_dim=6, out_dim=4)
    # LLaVA-1.5's mm_projector: Sequential(Linear, GELU, Linear) → keys 0.* and 2.*
    assert sorted(proj.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert proj[0].weight.shape == (4, 6) and proj[2].weight.shape == (4, 4)
    x = torch.randn(3, 6)
    sd = proj.state_dict()
    expected = F.linear(
        F.gelu(F.linear(x, sd["0.weight"], sd["0.bias"])), sd["2.weight"], sd["2.bias"]
    )
    torch.testing.assert_close(proj(x), expected)
    assert len(MLPProjector(6, 4, depth=3)) == 5  # mlp3x_gelu shape


def test_linear_is_one_affine_map() -> None:
    proj = LinearProjector(in_dim=6, out_dim=4)
    assert sorted(proj.state_dict()) == ["bias", "weight"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(proj(x), x @ proj.weight.T + proj.bias)
    assert LinearProjector(6, 4, bias=False).bias is None


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_dims_raise(name: str, bad) -> None:
    with pytest.raises(ValueError, match=f"projector '{name}': in_dim must be a positive integer"):
        create("projector", name, in_dim=bad, out_dim=4)
