"""APuDAE: DAE training/calibration jobs, purifier contract, unrolled gradient (REDNet itself:
tests/test_rednet.py; the Adam step: tests/test_steps.py)."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from jobs import calibrate_dae, train_dae
from pipeline.attacks.pgd import PGD
from pipeline.classifiers import small_cnn
from pipeline.evaluation.defense import Defense, honest_gradient_mode
from pipeline.io import checkpoints, datasets, storage
from pipeline.purifiers.apudae import APuDAEPurifier, APuDAESettings, CalibrationError, calibrate, recon_error
from pipeline.purifiers.nets import rednet
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise
from pipeline.train.loops import train_classifier, train_denoiser
from pipeline.train.recipes import holdout_split

log = logging.getLogger(__name__)


def keyed(n: int, context: str = "apudae-test", offset: int = 0) -> Noise:
    return Noise.for_batch(0, [f"s{i + offset}" for i in range(n)], context)


@pytest.fixture(scope="module")
def digits():
    images, labels, _ = datasets.load_split("digits", "train")   # the split train_dae uses
    x, y = datasets.to_float_nchw(images), torch.from_numpy(labels)
    train_idx, held_idx = holdout_split(len(x), 300, 0)
    return x, y, train_idx, held_idx


@pytest.fixture(scope="module")
def dae_ckpt(tmp_path_factory):
    """A small REDNet DAE trained on digits by the job itself, and its calibration file."""
    out = str(tmp_path_factory.mktemp("dae") / "digits_dae.pt")
    meta = train_dae.main(["--data", "digits", "--out", out, "--arch", "rednet30", "--layers", "3",
                           "--features", "16", "--epochs", "15", "--lr", "3e-3",
                           "--batch-size", "32", "--holdout", "300"])
    calib = calibrate_dae.main(["--checkpoint", out])
    return out, meta, calib


@pytest.fixture(scope="module")
def classifier(digits):
    x, y, train_idx, _ = digits
    torch.manual_seed(0)
    clf = small_cnn.make(1, 10, 16)
    train_classifier(clf, x[train_idx], y[train_idx], epochs=10, lr=3e-3, batch_size=32)
    return clf.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def purifier(dae_ckpt):
    return PURIFIERS.build("apudae", checkpoint=dae_ckpt[0])


# ---------------------------------------------------------------- jobs

def test_jobs_help(capsys):
    for job in (train_dae, calibrate_dae):
        with pytest.raises(SystemExit) as err:
            job.main(["--help"])
        assert err.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out


def test_trained_dae_lowers_reconstruction_error_on_digits(dae_ckpt):
    _, meta, _ = dae_ckpt
    log.info("digits σ=%.2f held-out MSE noisy %.4f → denoised %.4f", meta["eval_sigma"],
             meta["heldout_mse_noisy"], meta["heldout_mse_denoised"])
    assert meta["heldout_mse_denoised"] < 0.7 * meta["heldout_mse_noisy"]


@pytest.mark.skipif(not datasets.mnist_available(),
                    reason="MNIST test set not found (pipeline.io.datasets.mnist_available() is False)")
def test_trained_dae_lowers_reconstruction_error_on_mnist():
    images, _ = datasets.load_mnist()
    x = datasets.to_float_nchw(images[:2300].copy())
    train, held = x[:2000], x[2000:]
    torch.manual_seed(0)
    net = rednet.make(in_channels=1, num_layers=5, num_features=16)
    train_denoiser(net, train, sigmas=(0.1, 0.2, 0.3), epochs=2, batch_size=32, lr=1e-3, seed=0)
    gen = torch.Generator().manual_seed(0)
    noisy = (held + 0.2 * torch.randn(held.shape, generator=gen)).clamp(0, 1)
    with torch.no_grad():
        den = net(noisy).clamp(0, 1)
    mse_noisy, mse_den = float((noisy - held).pow(2).mean()), float((den - held).pow(2).mean())
    log.info("MNIST σ=0.2 MSE noisy %.4f → denoised %.4f", mse_noisy, mse_den)
    assert mse_den < 0.5 * mse_noisy


def test_calibration_file(dae_ckpt, digits):
    ckpt, meta, calib = dae_ckpt
    stored = json.loads(storage.read_text(ckpt + ".calib.json"))
    assert stored["mu"] == pytest.approx(calib["mu"]) and stored["sigma"] > 0
    assert stored["n"] == 300 and stored["checkpoint_sha256"] == checkpoints.sha256(ckpt)
    # the held-out subset is the one the job never trained on
    x, _, _, held_idx = digits
    from pipeline.purifiers.apudae import load_dae
    dae, _ = load_dae(ckpt)
    again = calibrate(dae, x[held_idx])
    assert again["mu"] == pytest.approx(stored["mu"], rel=1e-6)


def test_builder_needs_calibration(dae_ckpt, tmp_path):
    ckpt = dae_ckpt[0]
    p = PURIFIERS.build("apudae", checkpoint=ckpt)
    assert p.settings.mu == pytest.approx(dae_ckpt[2]["mu"]) and p.settings.variant == "adaptive"
    assert (p.settings.steps, p.settings.lr) == (13, pytest.approx(2 / 255))
    bare = str(tmp_path / "bare.pt")
    storage.put_bytes(bare, storage.read_bytes(ckpt))
    with pytest.raises(CalibrationError, match="calibrate_dae.py"):
        PURIFIERS.build("apudae", checkpoint=bare)
    assert PURIFIERS.build("apudae", checkpoint=bare, variant="simple").settings.steps == 12
    assert PURIFIERS.build("apudae", checkpoint=bare, mu=1.0, sigma=0.5).settings.mu == 1.0
    storage.put_text(bare + ".calib.json", json.dumps({"mu": 1.0, "sigma": 0.5, "checkpoint_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="another checkpoint"):
        PURIFIERS.build("apudae", checkpoint=bare)


# ---------------------------------------------------------------- purifier contract

@pytest.mark.parametrize("variant", ["adaptive", "simple", "distance"])
def test_contract(dae_ckpt, digits, variant):
    p = PURIFIERS.build("apudae", checkpoint=dae_ckpt[0], variant=variant)
    assert p.flags() == {"stochastic": variant == "adaptive", "differentiable": False,
                         "test_time_optimization": True}
    x = digits[0][:6]
    noise = keyed(6)
    out, nfe, _ = p.purify(x, noise)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert nfe == p.settings.steps
    assert torch.equal(out, p(x, keyed(6)))                      # same keys → same output
    part = p(x[[4, 1]], noise.select(torch.tensor([4, 1])))      # same rows, another batch
    torch.testing.assert_close(part, out[[4, 1]], rtol=0, atol=0)
    single = p(x[3:4], noise.select(slice(3, 4)))
    torch.testing.assert_close(single, out[3:4], rtol=0, atol=0)
    if variant == "adaptive":
        assert not torch.equal(out, p(x, keyed(6, context="other")))
    assert not torch.equal(out, x)


def test_small_dae_checkpoint_loads(tmp_path, digits):
    from pipeline.purifiers.nets.small_dae import ARCH, SmallDAE

    ckpt = str(tmp_path / "small.pt")
    torch.manual_seed(0)
    checkpoints.save(ckpt, ARCH, {"in_channels": 1, "width": 8}, SmallDAE(1, 8).state_dict())
    p = PURIFIERS.build("apudae", checkpoint=ckpt, variant="distance", mu=1.0, sigma=0.5)
    assert p.record()["arch"] == ARCH
    assert p(digits[0][:2], keyed(2)).shape == (2, 1, 8, 8)
    checkpoints.save(ckpt, "resnet", {}, {})
    with pytest.raises(checkpoints.CheckpointError, match="small_dae"):
        PURIFIERS.build("apudae", checkpoint=ckpt, variant="simple")


def test_adaptive_kicks_come_from_noise_only(dae_ckpt, digits):
    p = PURIFIERS.build("apudae", checkpoint=dae_ckpt[0], noise_eps=0.0)
    x = digits[0][:3]
    assert torch.equal(p(x, keyed(3)), p(x, keyed(3, context="other")))


def test_unrolled_gives_full_gradient(dae_ckpt, digits):
    ckpt = dae_ckpt[0]
    p = PURIFIERS.build("apudae", checkpoint=ckpt, unrolled=True, steps=4)
    detached = PURIFIERS.build("apudae", checkpoint=ckpt, steps=4)
    assert p.flags()["differentiable"] and not detached.flags()["differentiable"]
    assert honest_gradient_mode(p) == "bpda"                      # still test-time optimisation
    x0 = digits[0][:3]
    noise = keyed(3)
    x = x0.clone().requires_grad_(True)
    out = p(x, noise)
    torch.testing.assert_close(out.detach(), detached(x0, noise), rtol=0, atol=1e-5)
    (out * torch.linspace(0, 1, out.numel()).view_as(out)).sum().backward()
    g_full = x.grad.clone()
    assert torch.isfinite(g_full).all() and g_full.abs().sum() > 0
    x.grad = None
    (detached(x, noise) * torch.linspace(0, 1, out.numel()).view_as(out)).sum().backward()
    assert not torch.allclose(g_full, x.grad)                    # not the straight-through one


@pytest.mark.parametrize("variant", ["simple", "distance", "adaptive"])
def test_unrolled_gradient_matches_finite_differences(variant):
    """The unrolled forward's autograd is the true derivative (float64 gradcheck)."""
    from pipeline.purifiers.nets.small_dae import SmallDAE

    torch.manual_seed(0)
    dae = SmallDAE(1, 4).double().eval().requires_grad_(False)
    p = APuDAEPurifier(dae, APuDAESettings(variant=variant, mu=0.1, sigma=1.0, steps=3, lr=0.05, noise_eps=0.05,
                                           unrolled=True))
    x = (0.3 + 0.4 * torch.rand(2, 1, 4, 4, dtype=torch.float64)).requires_grad_(True)
    noise = keyed(2)
    assert float(recon_error(dae, x.detach()).min()) > 0.1         # away from the r = μ kink
    assert torch.autograd.gradcheck(lambda z: p(z, noise), (x,), eps=1e-6, atol=1e-5)


def test_full_gradient_eot_attack_runs(dae_ckpt, digits, classifier):
    p = PURIFIERS.build("apudae", checkpoint=dae_ckpt[0], unrolled=True, steps=3)
    x, y = digits[0][:4], digits[1][:4]
    defense = Defense(classifier, p)
    keys = [f"a{i}" for i in range(4)]
    attack = PGD(eps=0.1, steps=2, random_start=False)
    res = attack(defense.attack_target("full", 0, keys, "atk", eot=2), x, y, Noise.for_batch(0, keys, "atk"))
    assert (res.x_adv - x).abs().max() <= 0.1 + 1e-6
    assert not torch.equal(res.x_adv, x)


def test_clean_inputs_adaptive_vs_simple(dae_ckpt, digits, classifier):
    x, y, _, held_idx = digits
    xc, yc = x[held_idx], y[held_idx]
    base = classifier(xc).argmax(1)
    stats = {}
    for variant in ("simple", "adaptive"):
        p = PURIFIERS.build("apudae", checkpoint=dae_ckpt[0], variant=variant)
        out = p(xc, Noise.for_batch(0, [str(int(i)) for i in held_idx], "clean"))
        pred = classifier(out).argmax(1)
        stats[variant] = {"acc": float((pred == yc).float().mean()),
                          "changed": float((pred != base).float().mean()),
                          "mean_abs_change": float((out - xc).abs().mean())}
    clean_acc = float((base == yc).float().mean())
    log.info("clean accuracy %.4f; %s", clean_acc, stats)
    # Measured over 3 seeds (docs/apudae_dip.md): both variants keep clean accuracy within a
    # few of the 300 images, in either direction, so which one changes it less is not a stable
    # relation and is not asserted. Stable on digits: the adaptive variant moves clean images
    # less (rows with r ≤ μ get no gradient; |Δx| ≈ 0.015 vs 0.022). On MNIST the accumulated
    # kicks on the black background reverse that (0.0095 vs 0.0076): a digits-only check.
    for v in stats.values():
        assert abs(v["acc"] - clean_acc) <= 0.02
    assert stats["adaptive"]["mean_abs_change"] < stats["simple"]["mean_abs_change"]


def test_recon_error_is_per_image_sum():
    dae = torch.nn.Identity()
    z = torch.rand(2, 1, 4, 4) * 2 - 0.5
    assert torch.equal(recon_error(dae, z), torch.zeros(2))
    r = recon_error(dae, z, clip=True)
    assert torch.allclose(r, (z - z.clamp(0, 1)).pow(2).flatten(1).sum(1))


def test_invalid_settings():
    with pytest.raises(ValueError):
        APuDAEPurifier(torch.nn.Identity(), APuDAESettings(variant="adaptive"))  # no calibration
    with pytest.raises(ValueError):
        APuDAEPurifier(torch.nn.Identity(), APuDAESettings(variant="nope", mu=1.0, sigma=1.0))
