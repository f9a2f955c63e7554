"""ADP purifier (Yoon et al. 2021): step math, contract, checkpoints, training, denoising."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.io import checkpoints, datasets
from pipeline.purifiers import steps
from pipeline.purifiers.adp import ADPPurifier, ADPSettings
from pipeline.purifiers.nets.score_nets import SmallScoreNet
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise
from pipeline.train.loops import psnr

torch.set_num_threads(1)


class LinearScore(nn.Module):
    """s(x) = −(x − m)/v; rows whose mean exceeds `repel_above` get +(x − m)/v instead
    (negative curvature: z > 1, so ADP's step size hits its floor and the row stops)."""

    def __init__(self, m: float, v: float, repel_above: float = math.inf):
        super().__init__()
        self.m, self.v, self.repel_above = m, v, repel_above

    def forward(self, x):
        sign = torch.where(x.flatten(1).mean(1) > self.repel_above, 1.0, -1.0).to(x.dtype)
        return sign.view(-1, 1, 1, 1) * (x - self.m) / self.v


def keyed(n: int, replicas: int = 1, context: str = "t", seed: int = 0) -> Noise:
    return Noise.for_batch(seed, [f"img{i}" for i in range(n)], context, replicas)


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    net = SmallScoreNet(in_channels=1, width=4).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


# ---------------------------------------------------------------------------------------
# step math, hand-computed
# ---------------------------------------------------------------------------------------

def test_step_size_closed_form_for_linear_score():
    # s(x) = −(x − m)/v: z = 1 − δ/v and α = λδ/(1 − z) = λ·v
    m, v, delta, lam = 0.3, 0.5, 1e-3, 0.05
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    s = LinearScore(m, v)
    g = s(x)
    gp = s(x + delta * g)
    z = steps.row_dot(g, gp) / steps.row_dot(g, g)
    torch.testing.assert_close(z, torch.full((4,), 1 - delta / v, dtype=torch.float64))
    alpha = steps.adp_step_size(g, gp, delta, lam, 1e-5, 1e-1)
    torch.testing.assert_close(alpha, torch.full((4,), lam * v, dtype=torch.float64))
    # clipped at both ends
    assert torch.all(steps.adp_step_size(g, gp, delta, 10.0, 1e-5, 1e-1) == 1e-1)
    rep = LinearScore(m, v, repel_above=-math.inf)  # s(x) = +(x − m)/v: z = 1 + δ/v > 1 → floor
    gr = rep(x)
    alpha_rep = steps.adp_step_size(gr, rep(x + delta * gr), delta, lam, 1e-5, 1e-1)
    assert torch.all(alpha_rep == 1e-5)


def test_one_adp_step_hand_computed():
    m, v, lam = 0.4, 0.5, 0.05
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    p = ADPPurifier(LinearScore(m, v), ADPSettings(sigma=0.0, max_iter=1, lam=lam))
    out, nfe, stats = p.purify(x, keyed(3))
    xg = steps.to_score_grid(x)
    expected = steps.from_score_grid(xg - lam * (xg - m)).clamp(0, 1)  # α·s = −λ(x − m)
    torch.testing.assert_close(out, expected)
    assert nfe == 2 and stats["steps"].tolist() == [1, 1, 1]  # α = λv (test above) > stop_alpha
    # ten steps: the distance to m shrinks by (1 − λ)^10 on the grid
    p10 = ADPPurifier(LinearScore(m, v), ADPSettings(sigma=0.0, max_iter=10, lam=lam))
    expected10 = steps.from_score_grid(m + (1 - lam) ** 10 * (xg - m)).clamp(0, 1)
    out10 = p10.purify(x, keyed(3))
    torch.testing.assert_close(out10.images, expected10)
    assert out10.stats["steps"].tolist() == [10, 10, 10]


def test_shared_helpers_straight_through_and_chunks():
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    y = x.detach() ** 2
    out = steps.straight_through(x, y)
    torch.testing.assert_close(out, y)                          # forward: y (up to rounding)
    (g,) = torch.autograd.grad((out * 3).sum(), x)
    assert torch.equal(g, torch.full_like(x, 3.0))              # backward: identity
    # chunks of 2 + 2 + 1 rows: same images, nfe per row is the max over chunks, not the sum
    p = ADPPurifier(LinearScore(0.5, 0.5, repel_above=0.6), ADPSettings(sigma=0.1, max_iter=4))
    xs = torch.cat([torch.full((3, 1, 4, 4), 0.2), torch.full((2, 1, 4, 4), 0.9)]).double()
    whole = p.purify(xs, keyed(5))
    chunked = steps.purify_in_chunks(p.purify, xs, keyed(5), 2)
    torch.testing.assert_close(chunked.images, whole.images, rtol=0, atol=0)
    assert chunked.nfe == whole.nfe == 8
    assert torch.equal(chunked.stats["steps"], whole.stats["steps"])  # per-row stats concatenated


def test_stopped_rows_stay_fixed_while_others_move():
    # rows with mean > 0.6 are repelled → α = α_min ≤ stop_alpha → stop at once, unchanged
    x = torch.cat([torch.full((2, 1, 4, 4), 0.2), torch.full((2, 1, 4, 4), 0.9)]).double()
    p = ADPPurifier(LinearScore(0.5, 0.5, repel_above=0.6), ADPSettings(sigma=0.0, max_iter=5))
    out, _, stats = p.purify(x, keyed(4))
    torch.testing.assert_close(out[2:], x[2:])  # grid round trip is exact up to rounding
    assert torch.all(out[:2] > x[:2])
    assert stats["steps"].tolist() == [5, 5, 0, 0]
    # all rows stopped: the loop ends after the first iteration, output = input
    p_all = ADPPurifier(LinearScore(0.5, 0.5, repel_above=-1.0), ADPSettings(sigma=0.0, max_iter=5))
    out_all, nfe_all, _ = p_all.purify(x, keyed(4))
    torch.testing.assert_close(out_all, x)
    assert nfe_all == 2


def test_regrid_each_step_reproduces_reference_quirk():
    m, v, lam = 0.4, 0.5, 0.05
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    p = ADPPurifier(LinearScore(m, v), ADPSettings(sigma=0.0, max_iter=2, lam=lam, regrid_each_step=True))
    x1 = steps.from_score_grid(steps.to_score_grid(x) * (1 - lam) + lam * m).clamp(0, 1)
    x2 = steps.from_score_grid(x1 * (1 - lam) + lam * m).clamp(0, 1)  # no re-gridding of x1
    torch.testing.assert_close(p(x, keyed(2)), x2)


def test_smoothing_noise_is_keyed_gaussian_and_binary():
    x = torch.full((2, 1, 8, 8), 0.5)
    noise = keyed(2)
    p = ADPPurifier(LinearScore(0.5, 0.5), ADPSettings(sigma=0.25, max_iter=0))
    expected = (x + 0.25 * noise.normal((1, 8, 8), purpose="adp/init")).clamp(0, 1)
    torch.testing.assert_close(p(x, noise), expected)
    pb = ADPPurifier(LinearScore(0.5, 0.5), ADPSettings(sigma=0.25, max_iter=0, noise_type="binary"))
    d = (pb(x, noise) - x).abs()
    torch.testing.assert_close(d, torch.full_like(d, 0.25 * math.sqrt(2 / math.pi)))


# ---------------------------------------------------------------------------------------
# purifier contract
# ---------------------------------------------------------------------------------------

def test_contract_shape_range_flags(small_net):
    p = ADPPurifier(small_net, ADPSettings(max_iter=3))
    assert p.flags() == {"stochastic": True, "differentiable": True, "test_time_optimization": False}
    x = torch.rand(4, 1, 8, 8)
    out = p(x, keyed(4))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert p.record()["sigma"] == 0.25 and p.record()["lam"] == 0.05


def test_deterministic_and_batch_independent(small_net):
    p = ADPPurifier(small_net, ADPSettings(max_iter=3))
    x = torch.rand(5, 1, 8, 8)
    keys = [f"k{i}" for i in range(5)]
    a = p(x, Noise.for_batch(7, keys, "ctx"))
    b = p(x, Noise.for_batch(7, keys, "ctx"))
    assert torch.equal(a, b)
    sub = p(x[[3, 1]], Noise.for_batch(7, [keys[3], keys[1]], "ctx"))
    torch.testing.assert_close(sub, a[[3, 1]], rtol=0, atol=1e-6)
    # replicas of one sample are different draws
    reps = p(x[:1].repeat_interleave(3, 0), Noise.for_batch(7, keys[:1], "ctx", replicas=3))
    assert not torch.allclose(reps[0], reps[1])


def test_gradient_flows_to_input(small_net):
    p = ADPPurifier(small_net, ADPSettings(max_iter=3))
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    p(x, keyed(2)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_checkpointed_steps_give_the_same_gradient(small_net):
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    net = small_net.double()
    try:
        grads = []
        for segment in (0, 1, 2, -1):  # off, every step, 2 steps, √K steps
            p = ADPPurifier(net, ADPSettings(max_iter=3, checkpoint_segment=segment))
            (g,) = torch.autograd.grad((p(x, keyed(2)) ** 2).sum(), x)
            grads.append(g)
        for g in grads[1:]:
            torch.testing.assert_close(grads[0], g)
    finally:
        small_net.float()


def test_trajectory_ends_at_forward(small_net):
    p = ADPPurifier(small_net, ADPSettings(max_iter=4))
    x = torch.rand(3, 1, 8, 8)
    traj = p.trajectory(x, keyed(3))
    assert len(traj) >= 2 and all(t.shape == x.shape for t in traj)
    torch.testing.assert_close(traj[-1], p(x, keyed(3)))
    torch.testing.assert_close(traj[0], p.smooth(x, keyed(3)))


# ---------------------------------------------------------------------------------------
# builder, checkpoints
# ---------------------------------------------------------------------------------------

def test_builder_loads_our_checkpoint(tmp_path, small_net):
    path = str(tmp_path / "score.pt")
    checkpoints.save(path, "small_score", {"in_channels": 1, "width": 4}, small_net.state_dict(), {"job": "test"})
    p = PURIFIERS.build("adp", checkpoint=path, max_iter=2, sigma=0.1)
    assert isinstance(p, ADPPurifier) and p.settings.sigma == 0.1 and p.record()["net_format"] == "advpure"
    assert not any(q.requires_grad for q in p.parameters())
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(p(x, keyed(2)), ADPPurifier(small_net, ADPSettings(sigma=0.1, max_iter=2))(x, keyed(2)))
    with pytest.raises(ValueError):
        PURIFIERS.build("adp", checkpoint=path, noise_type="uniform")
    with pytest.raises(checkpoints.CheckpointError):
        PURIFIERS.build("adp", checkpoint=path, arch="ncsnv2")


# ---------------------------------------------------------------------------------------
# training and denoising (slow, but run in CI)
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_digits():
    from pipeline.purifiers.nets.score_nets import geometric_sigmas
    from pipeline.train.recipes import train_score

    images, _ = datasets.load_digits()
    x = datasets.to_float_nchw(images)
    train_x, test_x = x[:1500], x[1500:1628]
    torch.manual_seed(0)
    net = SmallScoreNet(in_channels=1, width=8)
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    model, losses = train_score(net, train_x, sigmas=sigmas, epochs=20, batch_size=128, lr=2e-3,
                                ema_rate=0.99, seed=0, max_steps=150, log_every=1000)
    return model, losses, test_x


@pytest.mark.slow
def test_training_reduces_dsm_loss(trained_digits):
    _, losses, _ = trained_digits
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.8 * first, (first, last)


@pytest.mark.slow
def test_trained_adp_denoises_digits(trained_digits):
    model, _, test_x = trained_digits
    for q in model.parameters():
        q.requires_grad_(False)
    p = ADPPurifier(model)  # the paper's settings: σ 0.25, 10 steps, λ 0.05, δ 1e-3
    traj = p.trajectory(test_x, keyed(len(test_x), context="denoise"))
    noisy, purified = psnr(traj[0], test_x), psnr(traj[-1], test_x)
    assert purified > noisy + 0.5, (noisy, purified)


@pytest.mark.slow
def test_adp_on_mnist_images(small_net):
    if not datasets.mnist_available():
        pytest.skip("MNIST idx files not found (pipeline.io.datasets.mnist_available() is False)")
    images, _ = datasets.load_mnist()
    x = datasets.to_float_nchw(images[:4].copy())
    p = ADPPurifier(small_net, ADPSettings(max_iter=2))
    out = p(x, keyed(4))
    assert out.shape == (4, 1, 28, 28) and out.min() >= 0 and out.max() <= 1
