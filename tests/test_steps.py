"""pipeline.purifiers.steps: the purifiers' update rules as pure tensor math, hand-computed
(the checkpointed loops are in tests/test_checkpointing.py)."""
from __future__ import annotations

import pytest
import torch

from pipeline.purifiers import steps


def test_grid_maps_are_inverse():
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(steps.from_score_grid(steps.to_score_grid(x)), x)
    assert steps.to_score_grid(torch.tensor(0.0)) == 1 / 512
    assert steps.to_score_grid(torch.tensor(1.0)) == 1 - 1 / 512


def test_update_clips_to_unit_interval():
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    g = torch.tensor([[[[10.0, -10.0], [0.1, 0.0]]]], dtype=torch.float64)
    out = steps.adp_update(x, g, torch.tensor([0.1], dtype=torch.float64), torch.tensor([True]))
    assert out.flatten().tolist() == [1.0, 0.0, pytest.approx(0.51), 0.5]


def test_langevin_step_formula():
    x = torch.randn(2, 3)
    g = torch.randn(2, 3)
    z = torch.randn(2, 3)
    torch.testing.assert_close(steps.langevin_step(x, g, 0.01, z), x - g + 0.01 * z)


def test_adam_update_matches_torch_adam():
    torch.manual_seed(0)
    p0 = torch.randn(5)
    p_ref = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p_ref], lr=0.01)
    p, m, v = p0.clone(), torch.zeros(5), torch.zeros(5)
    for t in range(1, 6):
        g = torch.sin(3 * p.detach()) + t
        p_ref.grad = torch.sin(3 * p_ref.detach()) + t
        opt.step()
        p, m, v = steps.adam_update(p, g, m, v, t, 0.01)
    torch.testing.assert_close(p, p_ref.detach(), rtol=0, atol=1e-6)
