"""Long-run Langevin EBM purifier (Hill et al. 2021): step math, contract, training."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.io import checkpoints, datasets
from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier, LangevinEBMSettings
from pipeline.purifiers.nets.ebm_nets import EBM
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise

torch.set_num_threads(1)


class QuadraticEnergy(nn.Module):
    """U(X) = a/2 · ‖X − m‖² per row, so ∇U = a·(X − m)."""

    def __init__(self, a: float, m: float):
        super().__init__()
        self.a, self.m = a, m

    def forward(self, X):
        return 0.5 * self.a * ((X - self.m) ** 2).flatten(1).sum(1)


def keyed(n: int, replicas: int = 1, context: str = "t") -> Noise:
    return Noise.for_batch(0, [f"img{i}" for i in range(n)], context, replicas)


@pytest.fixture(scope="module")
def small_ebm():
    torch.manual_seed(0)
    net = EBM(n_c=1, n_f=8, image_size=8).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def test_one_step_quadratic_energy_hand_computed():
    a, m, eps = 0.3, 0.2, 0.01
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    noise = keyed(3)
    p = LangevinEBMPurifier(QuadraticEnergy(a, m), LangevinEBMSettings(steps=1, eps=eps, clip_output=False))
    X = 2 * x - 1
    z = noise.normal((1, 4, 4), purpose="langevin_ebm/z", step=0).double()
    expected = (X - a * (X - m) + eps * z + 1) / 2
    out, nfe, _ = p.purify(x, noise)
    torch.testing.assert_close(out, expected)
    assert nfe == 1


def test_many_steps_without_noise_contract_to_the_minimum():
    a, m, K = 0.1, 0.2, 25
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    p = LangevinEBMPurifier(QuadraticEnergy(a, m), LangevinEBMSettings(steps=K, eps=0.0, clip_output=False))
    X = 2 * x - 1
    torch.testing.assert_close(p(x, keyed(2)), (m + (1 - a) ** K * (X - m) + 1) / 2)


def test_no_clipping_inside_the_chain_and_optional_clip_at_the_end():
    # a minimum outside [−1, 1] pulls the chain out of the image range
    x = torch.full((1, 1, 4, 4), 0.9, dtype=torch.float64)
    free = LangevinEBMPurifier(QuadraticEnergy(0.5, 3.0), LangevinEBMSettings(steps=10, clip_output=False))(x, keyed(1))
    assert free.max() > 1.0
    clipped = LangevinEBMPurifier(QuadraticEnergy(0.5, 3.0), LangevinEBMSettings(steps=10))(x, keyed(1))  # clips
    torch.testing.assert_close(clipped, free.clamp(0, 1))


def test_contract(small_ebm):
    p = LangevinEBMPurifier(small_ebm, LangevinEBMSettings(steps=20))
    assert p.flags() == {"stochastic": True, "differentiable": True, "test_time_optimization": False}
    x = torch.rand(5, 1, 8, 8)
    keys = [f"k{i}" for i in range(5)]
    a = p(x, Noise.for_batch(3, keys, "c"))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, p(x, Noise.for_batch(3, keys, "c")))
    sub = p(x[[4, 0]], Noise.for_batch(3, [keys[4], keys[0]], "c"))
    torch.testing.assert_close(sub, a[[4, 0]], rtol=0, atol=1e-6)
    reps = p(x[:1].repeat_interleave(2, 0), Noise.for_batch(3, keys[:1], "c", replicas=2))
    assert not torch.allclose(reps[0], reps[1])
    assert p.record() == {"steps": 20, "eps": 0.01, "clip_output": True, "checkpoint_segment": -1, "net": None}


def test_gradient_flows_and_checkpointing_is_exact(small_ebm):
    net = EBM(n_c=1, n_f=8, image_size=8).double().eval()
    net.load_state_dict(small_ebm.state_dict())
    for q in net.parameters():
        q.requires_grad_(False)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    grads, outs = [], []
    for segment in (0, 3, -1):  # plain, 3-step segments, √K segments
        p = LangevinEBMPurifier(net, LangevinEBMSettings(steps=12, checkpoint_segment=segment, clip_output=False))
        y = p(x, keyed(2))
        (g,) = torch.autograd.grad((y ** 2).sum(), x)
        grads.append(g)
        outs.append(y.detach())
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    for g, y in zip(grads[1:], outs[1:]):
        torch.testing.assert_close(g, grads[0])
        torch.testing.assert_close(y, outs[0])
    # evaluated without a graph, the same chain
    with torch.no_grad():
        plain = LangevinEBMPurifier(net, LangevinEBMSettings(steps=12, clip_output=False))
        torch.testing.assert_close(plain(x, keyed(2)), outs[0])


def test_second_order_gradient_matches_finite_differences():
    # d/dx of one step through ∇U needs the Hessian: check against finite differences
    net = EBM(n_c=1, n_f=4, image_size=8).double().eval()
    for q in net.parameters():
        q.requires_grad_(False)
    p = LangevinEBMPurifier(net, LangevinEBMSettings(steps=3, clip_output=False))
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    (g,) = torch.autograd.grad((p(x, keyed(1)) * w).sum(), x)
    d = torch.randn_like(x)
    h = 1e-6
    with torch.no_grad():
        fd = ((p(x + h * d, keyed(1)) * w).sum() - (p(x - h * d, keyed(1)) * w).sum()) / (2 * h)
    torch.testing.assert_close((g * d).sum(), fd, rtol=1e-5, atol=1e-8)


def test_trajectory_ends_at_forward(small_ebm):
    p = LangevinEBMPurifier(small_ebm, LangevinEBMSettings(steps=10))
    x = torch.rand(2, 1, 8, 8)
    traj = p.trajectory(x, keyed(2), every=4)
    assert len(traj) == 4  # 0, 4, 8, 10 steps
    torch.testing.assert_close(traj[-1], p(x, keyed(2)))


def test_builder_reads_published_and_our_checkpoints(tmp_path, small_ebm):
    # published layout: a plain state dict f.0 … f.8 (CIFAR-10 network)
    torch.manual_seed(1)
    pub = EBM()
    assert list(pub.state_dict()) == [f"f.{i}.{w}" for i in (0, 2, 4, 6, 8) for w in ("weight", "bias")]
    path = tmp_path / "ebm.pth"
    torch.save(pub.state_dict(), path)
    p = PURIFIERS.build("langevin_ebm", checkpoint=str(path), steps=2)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(p.energy_net(2 * x - 1), pub(2 * x - 1))
    assert p(x, keyed(2)).shape == x.shape
    # DataParallel prefix
    torch.save({f"module.{k}": v for k, v in pub.state_dict().items()}, tmp_path / "ebm_dp.pth")
    p2 = PURIFIERS.build("langevin_ebm", checkpoint=str(tmp_path / "ebm_dp.pth"), steps=2)
    torch.testing.assert_close(p2.energy_net(2 * x - 1), pub(2 * x - 1))
    # ours (jobs/train_ebm.py)
    ours = str(tmp_path / "ours.pt")
    checkpoints.save(ours, "ebm", {"n_c": 1, "n_f": 8, "image_size": 8}, small_ebm.state_dict())
    p3 = PURIFIERS.build("langevin_ebm", checkpoint=ours, steps=3, eps=0.02)
    assert p3.record()["net_format"] == "advpure" and p3.settings.eps == 0.02
    xs = torch.rand(2, 1, 8, 8)
    same = LangevinEBMPurifier(small_ebm, LangevinEBMSettings(steps=3, eps=0.02))
    torch.testing.assert_close(p3(xs, keyed(2)), same(xs, keyed(2)))
    # a mismatching state dict is refused
    with pytest.raises(checkpoints.CheckpointError):
        PURIFIERS.build("langevin_ebm", checkpoint=str(path), net={"n_c": 1})


# ------------------------------------------------------------------ a briefly trained digits EBM
# The digits recipe (pipeline.train.recipes.EBM_RECIPES["digits"]) at a small scale: width 8,
# 150 batches of 50, 10 Langevin steps per update, a bank of 100 — about 5 s of one core.
# Statistical assertions only: every margin is a multiple of a standard error computed from
# the samples at hand, never a float fixed from one machine's run.

BRIEF = {"batch_size": 50, "shortrun_steps": 10, "bank_size": 100}


def _se_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of mean(a) − mean(b), independent samples (Welch)."""
    return float((a.var() / len(a) + b.var() / len(b)).sqrt())


@pytest.fixture(scope="module")
def brief_digits_ebm():
    from pipeline.train.recipes import EBM_RECIPES, train_ebm

    x_train, _ = _digits("train")
    x_held, _ = _digits("test")
    cfg = {**EBM_RECIPES["digits"], **BRIEF}
    torch.manual_seed(0)
    net = EBM(n_c=1, n_f=8, image_size=8, act=cfg["act"])
    keys = ("batch_size", "lr_adam", "lr_final", "lr_sgd", "switch_step", "epsilon", "data_epsilon",
            "shortrun_steps", "init", "rejuvenate", "start_sigma", "bank_size", "ema")
    hist = train_ebm(net, 2 * x_train - 1, n_steps=150, seed=0, log_every=0, **{k: cfg[k] for k in keys})
    for q in net.parameters():
        q.requires_grad_(False)
    return net.eval(), hist, x_held[:96]


def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, _ = datasets.load_split("digits", split)
    return datasets.to_float_nchw(images), torch.from_numpy(labels)


@pytest.mark.slow
def test_brief_reference_recipe_energy_is_lower_on_held_out_digits_than_on_noise():
    """The reference recipe's bank of uniform noise teaches the model that noise is not data
    (the digits recipe's data-initialised bank never shows it noise, so it is not asked to)."""
    from pipeline.train.recipes import train_ebm

    x_train, _ = _digits("train")
    held = _digits("test")[0][:96]
    torch.manual_seed(0)
    net = EBM(n_c=1, n_f=8, image_size=8)
    hist = train_ebm(net, 2 * x_train - 1, n_steps=100, batch_size=50, lr_adam=1e-3, shortrun_steps=10,
                     switch_step=10**9, bank_size=100, seed=0, log_every=0)
    assert not hist["diverged"] and all(torch.isfinite(torch.tensor(hist["d"])))
    noise = torch.rand(len(held), 1, 8, 8, generator=torch.Generator().manual_seed(5))
    p = LangevinEBMPurifier(net)
    with torch.no_grad():
        u_data, u_noise = p.energy(held), p.energy(noise)
    gap = float(u_noise.mean() - u_data.mean())
    assert gap > 3 * _se_diff(u_noise, u_data)  # far beyond sampling noise, on images never trained on


@pytest.mark.slow
def test_brief_recipe_chains_stay_at_the_data_energy_level(brief_digits_ebm):
    """The failure this recipe fixes: chains from clean images sliding far below the data's
    energy. Bound: the spread of the held-out images' own energies (one standard deviation),
    plus three standard errors of the mean drop."""
    net, _, held = brief_digits_ebm
    p = LangevinEBMPurifier(net, LangevinEBMSettings(steps=300, eps=0.01))
    chains = p(held, keyed(len(held), context="brief"))
    with torch.no_grad():
        u_data, u_chain = p.energy(held), p.energy(chains)
    drop = u_data - u_chain  # > 0: the chain went below where it started
    bound = float(u_data.std()) + 3 * float(drop.std()) / len(drop) ** 0.5
    assert float(drop.mean()) < bound


@pytest.mark.slow
def test_mnist_sized_ebm(small_ebm):
    if not datasets.mnist_available():
        pytest.skip("MNIST idx files not found (pipeline.io.datasets.mnist_available() is False)")
    images, _ = datasets.load_mnist()
    x = datasets.to_float_nchw(images[:3].copy())
    net = EBM(n_c=1, n_f=8, image_size=28).eval()
    out = LangevinEBMPurifier(net, LangevinEBMSettings(steps=3))(x, keyed(3))
    assert out.shape == (3, 1, 28, 28)
