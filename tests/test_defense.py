"""pipeline.evaluation.defense: the GPU path's code on the CPU — bf16 autocast and
channels_last networks (FastNet, speed_up), the purifiers kept in fp32, and torch.compile's
eager fallback for second-order gradients."""
from __future__ import annotations

import numpy as np
import torch

from pipeline import config
from pipeline.io import datasets


def _digits_protocol(digits_models, tmp_path, **evaluation):
    from pipeline.evaluation.protocol import build_protocol

    cfg = config.from_dict({
        "job": {"name": "t", "output": str(tmp_path / "o")}, "data": {"shards": "unused.tar"},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": digits_models["cnn"]}},
        "purifier": {"name": "dae", "params": {"checkpoint": digits_models["dae"]}},
        "attacks": [{"name": "pgd", "params": {"eps": 0.2, "steps": 2, "step_size": 0.1}, "gradient": "full"}],
        "evaluation": {"runs": 2, **evaluation}})
    return build_protocol(cfg)


def test_bf16_and_channels_last_run_the_same_evaluation_on_cpu(digits_models, tmp_path):
    from pipeline.evaluation.batch import evaluate_batch
    from pipeline.evaluation.defense import FastNet

    images, labels, _ = datasets.load_split("digits", "test")
    x, y = datasets.to_float_nchw(images[:32]), torch.from_numpy(labels[:32])
    keys = [f"d{i}" for i in range(32)]
    ref = evaluate_batch(_digits_protocol(digits_models, tmp_path), x, y, keys)
    p = _digits_protocol(digits_models, tmp_path, precision="bf16", channels_last=True)
    assert isinstance(p.defense.classifier, FastNet) and p.defense.classifier.bf16
    assert isinstance(p.defense.purifier.denoiser, FastNet) and p.defense.purifier.denoiser.bf16
    assert p.defense.classifier.net.normalize is not None
    logits = p.defense.classifier(x)
    assert logits.dtype == torch.float32  # fp32 out of a bf16 network
    rows = evaluate_batch(p, x, y, keys)
    agree = np.mean([a["clean_pred"] == b["clean_pred"] for a, b in zip(ref, rows)])
    assert agree >= 0.9
    assert all(np.isfinite(r["linf"]) and r["linf"] <= 0.2 + 1e-6 for r in rows)  # projection in fp32


def test_bf16_keeps_adp_and_test_time_optimisation_in_fp32():
    from pipeline.evaluation.defense import FastNet, autocast_safe, speed_up
    from pipeline.purifiers.adp import ADPPurifier
    from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier, LangevinEBMSettings
    from pipeline.purifiers.nets.ebm_nets import EBM
    from pipeline.purifiers.nets.score_nets import SmallScoreNet

    adp = ADPPurifier(SmallScoreNet(in_channels=1, width=4))
    ebm = LangevinEBMPurifier(EBM(n_c=1, n_f=4, image_size=8), LangevinEBMSettings(steps=2))
    assert not autocast_safe(adp) and autocast_safe(ebm)
    speed_up(torch.nn.Identity(), adp, "bf16")
    speed_up(torch.nn.Identity(), ebm, "bf16")
    assert isinstance(adp.score_net, FastNet) and not adp.score_net.bf16
    assert isinstance(ebm.energy_net, FastNet) and ebm.energy_net.bf16


def test_compiled_energy_falls_back_to_eager_for_second_order(monkeypatch):
    """torch.compile'd graphs cannot be differentiated twice: a full gradient through Langevin
    (∇U inside) runs the eager copy, the graph-free chain runs the compiled one — same values."""
    from pipeline.evaluation import defense
    from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier, LangevinEBMSettings
    from pipeline.purifiers.nets.ebm_nets import EBM
    from pipeline.seeding import Noise

    monkeypatch.setattr(defense, "COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(0)
    net = EBM(n_c=1, n_f=4, image_size=8).eval()
    for q in net.parameters():
        q.requires_grad_(False)
    plain = LangevinEBMPurifier(net, LangevinEBMSettings(steps=3, checkpoint_segment=0))
    fast = LangevinEBMPurifier(net, LangevinEBMSettings(steps=3, checkpoint_segment=0))
    defense.speed_up(torch.nn.Identity(), fast, compile=True)
    calls = {"eager": 0}
    fast.energy_net.net.register_forward_hook(lambda *a: calls.__setitem__("eager", calls["eager"] + 1))
    noise = Noise.for_batch(0, ["a", "b"], "c")
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, noise), plain(x, noise))
    xg = x.clone().requires_grad_(True)
    (g_fast,) = torch.autograd.grad(fast(xg, noise).sum(), xg)
    (g_plain,) = torch.autograd.grad(plain(xg, noise).sum(), xg)
    torch.testing.assert_close(g_fast, g_plain)
    assert calls["eager"] >= 3  # the second-order pass went eager
