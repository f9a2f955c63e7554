"""DiffPure against closed forms: with Gaussian data x₀ ~ N(μ, s²) the VP marginal's score is
linear, so every sampler is a linear Gaussian recursion whose output law and input gradient
are computed here independently of the purifier's code; plus keyed noise, gradients
(checkpointed, adjoint), settings, and a run through the pipeline's defense."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.evaluation.defense import Defense
from pipeline.io import checkpoints
from pipeline.purifiers import diffpure, vpsde
from pipeline.purifiers.base import SettingsError
from pipeline.purifiers.nets import small_unet
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise

MU, S = 0.1, 0.15   # data law on [−1, 1]; small enough that DDPM's x̂₀ clip never acts
U = 0.7             # the input pixel value in [0, 1]


def abar_cont(t: float) -> float:
    return math.exp(-0.5 * t * t * (20.0 - 0.1) - 0.1 * t)


def beta_cont(t: float) -> float:
    return 0.1 + t * (20.0 - 0.1)


def eps_coefs(t: float) -> tuple[float, float]:
    """The exact ε(x, t) = A·x + B for data N(MU, S²): ε = −σ·score, score = −(x − √ᾱμ)/v."""
    ab = abar_cont(t)
    v, sig = ab * S * S + 1.0 - ab, math.sqrt(1.0 - ab)
    return sig / v, -sig * math.sqrt(ab) * MU / v


class GaussianEps(diffpure.ScoreModel):
    """The exact ε-prediction of the VP marginal of N(MU, S²) data, element-wise."""

    def __init__(self):
        super().__init__(nn.Identity())

    def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        a, b = eps_coefs(t)
        return a * x + b


def discrete_abar() -> list[float]:
    out, p = [], 1.0
    for i in range(1000):
        p *= 1.0 - (0.1 + (20.0 - 0.1) * i / 999) / 1000
        out.append(p)
    return out


def linear_law(settings: diffpure.DiffPureSettings) -> tuple[float, float, float]:
    """(mean, variance, d output / d input) per pixel of the purified output in [0, 1]
    (no clip): X ← c·X + d + e·z from X₀ = 2U − 1, derived from the samplers' definitions."""
    ab = discrete_abar()
    level = round(settings.t_star * 1000)
    a0 = math.sqrt(ab[level - 1])
    M, V, G = a0 * (2 * U - 1), 1.0 - ab[level - 1], a0
    if settings.sampler == "ddpm":
        coefs = []
        for i in reversed(range(level)):
            A, B = eps_coefs((i + 0.5) / 1000)
            prev = ab[i - 1] if i else 1.0
            beta = 1.0 - ab[i] / prev
            p, q = (1.0 - math.sqrt(1.0 - ab[i]) * A) / math.sqrt(ab[i]), -math.sqrt(1.0 - ab[i]) * B / math.sqrt(ab[i])
            c0, ci = beta * math.sqrt(prev) / (1.0 - ab[i]), (1.0 - prev) * math.sqrt(1.0 - beta) / (1.0 - ab[i])
            var = beta * (1.0 - prev) / (1.0 - ab[i]) if i else 0.0
            coefs.append((c0 * p + ci, c0 * q, math.sqrt(var)))
    else:
        n = math.ceil((settings.t_star - settings.t_end) / settings.dt - 1e-9)
        h = (settings.t_star - settings.t_end) / n
        coefs = []
        for k in range(n):
            t = settings.t_star - k * h
            ab_t = abar_cont(t)
            v, bh = ab_t * S * S + 1.0 - ab_t, beta_cont(t) * h
            w = 1.0 if settings.sampler == "sde" else 0.5   # score weight: β (SDE) or ½β (ODE)
            coefs.append((1 + 0.5 * bh - w * bh / v, w * bh * math.sqrt(ab_t) * MU / v,
                          math.sqrt(bh) if settings.sampler == "sde" else 0.0))
    for c, d, e in coefs:
        M, V, G = c * M + d, c * c * V + e * e, c * G
    return (M + 1) / 2, V / 4, G   # u' = (X + 1)/2; dX₀/du = 2 cancels the ½


def keyed(n: int, replicas: int = 1, context: str = "c") -> Noise:
    return Noise.for_batch(0, [f"s{i}" for i in range(n)], context, replicas)


@pytest.mark.parametrize("sampler,dt", [("sde", 1e-3), ("ode", 1e-3), ("ddpm", 1e-3), ("sde", 7e-3)])
def test_output_law_matches_the_linear_recursion(sampler, dt):
    settings = diffpure.DiffPureSettings(sampler=sampler, dt=dt, clip_output=False)
    pur = diffpure.DiffPurePurifier(GaussianEps(), settings)
    rows = 64
    x = torch.full((rows, 1, 8, 8), U)
    with torch.no_grad():
        out = pur.purify(x, keyed(rows)).images.double().flatten()
    mean, var, _ = linear_law(settings)
    n = out.numel()   # 4,096 independent draws (every element has its own keyed noise)
    assert abs(out.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(out.var().item() - var) < 5 * var * math.sqrt(2.0 / (n - 1))


@pytest.mark.parametrize("sampler", ["sde", "ode", "ddpm"])
def test_input_gradient_matches_the_closed_form(sampler):
    settings = diffpure.DiffPureSettings(sampler=sampler, clip_output=False)
    pur = diffpure.DiffPurePurifier(GaussianEps(), settings)
    x = torch.full((3, 1, 4, 4), U, requires_grad=True)
    g, = torch.autograd.grad(pur.purify(x, keyed(3)).images.sum(), x)
    assert torch.allclose(g, torch.full_like(g, linear_law(settings)[2]), rtol=1e-4)


def test_checkpointed_gradient_equals_the_plain_one():
    net = small_unet.SmallUNet(1, width=8)
    model = diffpure.EpsilonModel(net.eval().requires_grad_(False))
    x = torch.rand(2, 1, 8, 8)
    grads = []
    for segment in (0, -1, 7):
        pur = diffpure.DiffPurePurifier(model, diffpure.DiffPureSettings(dt=4e-3, checkpoint_segment=segment))
        xi = x.clone().requires_grad_(True)
        out = pur.purify(xi, keyed(2)).images
        grads.append(torch.autograd.grad((out * torch.arange(64.0).view(1, 1, 8, 8)).sum(), xi)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-9)
    assert torch.allclose(grads[0], grads[2], rtol=1e-6, atol=1e-9)


def _adjoint_error(dt: float) -> tuple[float, float, float]:
    """(cosine, relative error) of the adjoint against the exact gradient, and the largest
    difference of their forward values, for a random linear functional of the output."""
    pytest.importorskip("torchsde")
    x = torch.rand(4, 1, 6, 6)
    w = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    outs, grads = [], []
    for method in ("exact", "adjoint"):
        settings = diffpure.DiffPureSettings(dt=dt, gradient_method=method, clip_output=False)
        xi = x.clone().requires_grad_(True)
        out = diffpure.DiffPurePurifier(GaussianEps(), settings).purify(xi, keyed(4)).images
        outs.append(out.detach())
        grads.append(torch.autograd.grad((out * w).sum(), xi)[0].flatten())
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], 0).item()
    rel = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    return cos, rel, (outs[0] - outs[1]).abs().max().item()


def test_adjoint_agrees_with_the_exact_gradient_to_its_discretisation_error():
    cos, rel, forward_gap = _adjoint_error(1e-3)
    assert forward_gap < 1e-5          # the same keyed Brownian path
    assert cos > 0.9999 and rel < 0.02
    assert _adjoint_error(1e-2)[1] > 2 * rel   # O(dt): ten times the step, a larger error


def test_rows_are_reproducible_in_any_batch_and_chunk():
    net = small_unet.SmallUNet(1, width=8).eval().requires_grad_(False)
    pur = diffpure.DiffPurePurifier(diffpure.EpsilonModel(net), diffpure.DiffPureSettings(dt=1e-2))
    x = torch.rand(5, 1, 8, 8)
    noise = keyed(5)
    with torch.no_grad():
        full = pur.purify(x, noise).images
        perm = torch.tensor([3, 0, 4, 1, 2])
        shuffled = pur.purify(x[perm], noise.select(perm)).images
        alone = pur.purify(x[2:3], noise.select(slice(2, 3))).images
        chunked = Defense(nn.Identity(), pur, max_rows=2).purify(x, noise).images
    assert torch.allclose(shuffled, full[perm], atol=1e-6)
    assert torch.allclose(alone, full[2:3], atol=1e-6)
    assert torch.allclose(chunked, full, atol=1e-6)


def test_replicas_are_independent_draws():
    pur = diffpure.DiffPurePurifier(GaussianEps(), diffpure.DiffPureSettings(dt=1e-2, clip_output=False))
    R = 2
    x = torch.full((32, 1, 8, 8), U)
    with torch.no_grad():
        out = pur.purify(x.repeat_interleave(R, 0), keyed(32, R)).images.view(32, R, -1)
    a, b = out[:, 0].flatten().double(), out[:, 1].flatten().double()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(a.numel())   # independent: |r| within 5 standard errors of 0
    assert not torch.equal(out[:, 0], out[:, 1])


def test_fixed_noise_is_deterministic_and_says_so():
    pur = diffpure.DiffPurePurifier(GaussianEps(), diffpure.DiffPureSettings(dt=1e-2, fixed_noise_seed=3))
    assert not pur.stochastic and diffpure.DiffPurePurifier(GaussianEps()).stochastic
    x = torch.rand(2, 1, 4, 4)
    with torch.no_grad():
        a = pur.purify(x, keyed(2, context="attack")).images
        b = pur.purify(x, keyed(2, context="eval")).images
    assert torch.equal(a, b)


@pytest.mark.parametrize("params,message", [
    ({"t_star": 0.0}, "purifier.params.t_star: must be in (0, 1], got 0.0"),
    ({"sampler": "euler"}, "purifier.params.sampler: must be one of 'sde', 'ode', 'ddpm', got 'euler'"),
    ({"dt": 0.5}, "purifier.params.dt: must be in (0, t_star], got 0.5"),
    ({"gradient_method": "adjoint_ode"}, "purifier.params.gradient_method: must be one of 'exact', 'adjoint'"),
    ({"checkpoint_segment": -2}, "purifier.params.checkpoint_segment: must be ≥ −1"),
    ({"t_sar": 0.1}, "purifier.params.t_sar: unknown setting; did you mean 't_star'?"),
    ({"sampler": "ode", "gradient_method": "adjoint"}, "gradient_method: must be 'exact' with sampler ode or ddpm"),
])
def test_settings_errors_name_the_dotted_key_and_the_allowed_values(params, message):
    with pytest.raises(SettingsError) as err:
        diffpure.DiffPureSettings.from_params(params, "purifier.params")
    assert message in str(err.value)


def test_a_surrogate_is_a_coarser_copy_of_the_settings():
    """Lee & Kim's surrogate process: the attack's `surrogate: {dt: 0.01}` as settings overrides."""
    s = diffpure.DiffPureSettings().replace({"dt": 0.01}, "attacks[0].surrogate")
    assert s.dt == 0.01 and diffpure.DiffPurePurifier(GaussianEps(), s).n_steps == 10
    with pytest.raises(SettingsError, match=r"attacks\[0\]\.surrogate\.steps: unknown setting"):
        diffpure.DiffPureSettings().replace({"steps": 10}, "attacks[0].surrogate")


def test_score_conventions():
    """score_sde: label 999·t, score −out/σ(t); ε-models: step ⌊1000·t⌋, learned σ dropped."""
    seen = []

    class Net(nn.Module):
        def __init__(self, out_channels: int):
            super().__init__()
            self.out_channels = out_channels

        def forward(self, x, t):
            seen.append(t)
            return torch.ones(x.shape[0], self.out_channels, *x.shape[2:])

    x = torch.zeros(2, 3, 4, 4)
    sigma = vpsde.VPSchedule().sigma(0.1)
    s = diffpure.ScoreSDEModel(Net(3)).score(x, 0.1)
    assert torch.allclose(seen[-1], torch.full((2,), 99.9)) and torch.allclose(s, torch.full_like(s, -1 / sigma))
    s = diffpure.EpsilonModel(Net(6)).score(x, 0.0995)
    assert seen[-1].tolist() == [99, 99] and s.shape == x.shape
    with pytest.raises(ValueError, match="returned 5 channels"):
        diffpure.EpsilonModel(Net(5)).score(x, 0.1)


def test_end_to_end_through_the_registry_and_the_defense(tmp_path):
    """A fresh tiny U-Net saved as our checkpoint, built by name with a surrogate-style
    override, attacked through the defense's full and BPDA views with EOT draws batched."""
    net = small_unet.SmallUNet(1, width=8)
    path = str(tmp_path / "unet.pt")
    checkpoints.save(path, small_unet.ARCH, {"channels": 1, "width": 8, "blocks": 1}, net.state_dict(), {})
    pur = PURIFIERS.build("diffpure", checkpoint=path, t_star=0.05, dt=1e-2)
    assert pur.n_steps == 5 and pur.record()["net_arch"] == small_unet.ARCH and pur.record()["t_star"] == 0.05
    with pytest.raises(SettingsError, match="'diffpure' params.steps: unknown setting"):
        PURIFIERS.build("diffpure", checkpoint=path, steps=3)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    defense = Defense(clf.requires_grad_(False), pur.requires_grad_(False), max_rows=5)
    x = torch.rand(2, 1, 8, 8)
    for mode in ("full", "bpda"):
        target = defense.attack_target(mode, 0, ["a", "b"], "attack0", eot=3)
        xi = x.clone().requires_grad_(True)
        logits = target(xi, 0)
        assert logits.shape == (2, 3, 10)
        g, = torch.autograd.grad(logits.sum(), xi)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_a_tiny_diffpure_evaluation_through_the_pipeline(tmp_path):
    """A config → protocol → one shard's evaluation, with untrained tiny networks: exact
    full-gradient PGD with EOT, the adjoint, a coarser surrogate, BPDA and fixed noise all run
    through the real stages, and the records name DiffPure's settings and cost."""
    import json

    from pipeline import config
    from pipeline.classifiers import small_cnn
    from pipeline.evaluation import stages
    from pipeline.evaluation.protocol import build_protocol
    from pipeline.io.shards import Sample

    unet, cnn = str(tmp_path / "unet.pt"), str(tmp_path / "cnn.pt")
    checkpoints.save(unet, small_unet.ARCH, {"channels": 1, "width": 8, "blocks": 1},
                     small_unet.SmallUNet(1, width=8).state_dict(), {})
    checkpoints.save(cnn, small_cnn.ARCH, {"in_channels": 1, "width": 8}, small_cnn.make(1, width=8).state_dict(), {})
    pgd = {"name": "pgd", "params": {"eps": 0.2, "steps": 1, "step_size": 0.1}}
    cfg = config.from_dict({
        "job": {"name": "dp", "output": str(tmp_path / "out")}, "data": {"shards": "unused.tar", "batch_size": 3},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": cnn}},
        "purifier": {"name": "diffpure", "params": {"checkpoint": unet, "t_star": 0.03, "dt": 0.01}},
        "attacks": [{**pgd, "gradient": "full", "eot": 2},
                    {**pgd, "gradient": "full", "surrogate": {"dt": 0.015}},
                    {**pgd, "gradient": "bpda"}],
        "evaluation": {"runs": 2}})
    images = torch.randint(0, 256, (3, 8, 8, 1), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    samples = [Sample(f"d{i}", images[i].numpy(), i) for i in range(3)]
    protocol = build_protocol(cfg)
    params = json.loads(protocol.provenance["purifier_params"])
    assert (params["t_star"], params["dt"], params["sampler"], params["net_arch"]) == (0.03, 0.01, "sde", "small_unet")
    out = stages.evaluate(protocol, samples)
    assert len(out.rows) == 3 * 3 and set(out.checks) == {"0", "1", "2"}
    # per row: 3 solver steps for the clean evaluation and 3 for the adversarial one, which a
    # confirmed break does not need, nor a sample misclassified clean (the clean gate)
    assert all(row["purify_nfe"] == 6 and len(row["purified_preds"]) == 2 if row["final_evaluated"]
               else row["purify_nfe"] == 3 and (row["broken_step"] >= 0 or row["attacked"] is False)
               for row in out.rows)
    surrogate = json.loads(out.rows[3]["attack_params"])["surrogate"]
    assert surrogate["dt"] == 0.015 and surrogate["t_star"] == 0.03


def test_chen2024_goes_through_the_exact_solver_without_a_second_network(tmp_path):
    """The chen2024 preset's surrogate {gradient_method: exact} on a purifier that is already
    exact builds no copy (one network in memory); a surrogate that changes a setting does."""
    from pipeline import config
    from pipeline.classifiers import small_cnn
    from pipeline.evaluation.protocol import build_protocol

    unet, cnn = str(tmp_path / "unet.pt"), str(tmp_path / "cnn.pt")
    checkpoints.save(unet, small_unet.ARCH, {"channels": 1, "width": 8, "blocks": 1},
                     small_unet.SmallUNet(1, width=8).state_dict(), {})
    checkpoints.save(cnn, small_cnn.ARCH, {"in_channels": 1, "width": 8}, small_cnn.make(1, width=8).state_dict(), {})
    cfg = config.from_dict({
        "job": {"name": "dp", "output": str(tmp_path / "out")}, "data": {"shards": "unused.tar"},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": cnn}},
        "purifier": {"name": "diffpure", "params": {"checkpoint": unet, "t_star": 0.03, "dt": 0.01}},
        "attacks": [{"preset": "chen2024", "overrides": {"eps": 0.2, "steps": 1}},
                    {"name": "pgd", "params": {"eps": 0.2, "steps": 1}, "gradient": "full",
                     "surrogate": {"dt": 0.015}}]})
    pgd, apgd, coarse = build_protocol(cfg).attacks
    assert (pgd.gradient, pgd.eot, apgd.gradient, apgd.eot) == ("full", 32, "full", 20)
    assert pgd.surrogate is None and apgd.surrogate is None
    assert coarse.surrogate is not None and coarse.surrogate.purifier.settings.dt == 0.015


# ------------------------------------------------------- the published networks (nets/ncsnpp.py, guided_unet.py)

TINY_NCSNPP = {"nf": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "image_size": 8, "attn_resolutions": (4,),
               "num_scales": 10}
TINY_GUIDED = {"image_size": 16, "model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
               "attention_resolutions": (8,), "num_head_channels": 16}


def test_score_sde_network_runs_in_its_convention(tmp_path):
    """A tiny DDPM++ (random weights) as score_sde's continuous model: label 999·t, score −out/σ."""
    ncsnpp = pytest.importorskip("pipeline.purifiers.nets.ncsnpp")
    net = ncsnpp.NCSNpp(**TINY_NCSNPP)
    path = str(tmp_path / "ncsnpp.pt")
    checkpoints.save(path, ncsnpp.ARCH, TINY_NCSNPP, net.state_dict(), {})
    pur = PURIFIERS.build("diffpure", checkpoint=path, network="score_sde", t_star=0.02, dt=0.01)
    assert isinstance(pur.score_model, diffpure.ScoreSDEModel) and pur.record()["net_convention"] == "score_sde"
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = pur.purify(x, keyed(2)).images
    g, = torch.autograd.grad(out.sum(), x)
    assert out.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    labels = []
    pur.score_model.net.register_forward_pre_hook(lambda m, args: labels.append(args[1].flatten()[0].item()))
    with torch.no_grad():
        pur.purify(x.detach(), keyed(2))
    assert labels == pytest.approx([999 * t for t, _ in vpsde.time_grid(0.02, 0.01, 1e-5)], rel=1e-6)


def test_guided_diffusion_network_with_learned_sigma_resize_and_bf16(tmp_path):
    """A tiny guided-diffusion U-Net (learned σ): ddpm through the resize route, in bf16 weights."""
    guided_unet = pytest.importorskip("pipeline.purifiers.nets.guided_unet")
    net = guided_unet.GuidedUNet(**TINY_GUIDED)
    path = str(tmp_path / "guided.pt")
    checkpoints.save(path, guided_unet.ARCH, TINY_GUIDED, net.state_dict(), {})
    pur = PURIFIERS.build("diffpure", checkpoint=path, network="guided_diffusion", sampler="ddpm", t_star=0.003,
                          resize=16, dtype="bfloat16")
    assert pur.n_steps == 3 and pur.record()["net_dtype"] == "bfloat16"
    with torch.no_grad():
        out = pur.purify(torch.rand(2, 3, 12, 12), keyed(2)).images
    assert out.shape == (2, 3, 12, 12) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_network_settings_are_checked_and_our_loader_points_to_the_published_ones(tmp_path):
    with pytest.raises(SettingsError, match="net: must be null with network 'ours'"):
        diffpure.DiffPureSettings(net={"nf": 8})
    with pytest.raises(SettingsError, match="dtype: must be 'float32' with network 'ours'"):
        diffpure.DiffPureSettings(dtype="bfloat16")
    path = str(tmp_path / "plain.pt")
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(checkpoints.CheckpointError, match="network: score_sde or guided_diffusion"):
        PURIFIERS.build("diffpure", checkpoint=path)


def test_train_diffusion_job_end_to_end(tmp_path):
    """A few DDPM steps of the job on digits: the checkpoint loads as the purifier's network,
    its meta has the loss and DiffPure's held-out PSNR, and samples come out as a PNG grid."""
    from jobs import train_diffusion

    out, png = str(tmp_path / "unet.pt"), str(tmp_path / "samples.png")
    assert train_diffusion.main(["--data", "digits", "--out", out, "--max-steps", "3", "--width", "8", "--limit", "64",
                                 "--eval-count", "2", "--samples", "2", "--samples-png", png, "--seed", "1"]) == 0
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["epochs"] == 250 and len(meta["loss_curve"]) == 3
    assert set(meta["denoising_psnr"]) == {"0.05", "0.1", "0.2"}
    assert PURIFIERS.build("diffpure", checkpoint=out, dt=0.05).record()["net_arch"] == small_unet.ARCH
    from PIL import Image

    assert Image.open(png).size == (19, 10)   # 2 images of 8×8 in one row, 1 px gaps
