"""The training skeleton (pipeline.train): seeded init, EMA, the fit loop, chain starts, the
shared job flags, and every jobs/ script as a command."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
from torch import nn

from pipeline.purifiers.nets import ebm_nets
from pipeline.train import common, loops, objectives, recipes
from tests.conftest import ROOT

JOBS = ("train_classifier", "train_dae", "train_score", "train_ebm", "calibrate_dae", "train_diffusion")


# ---------------------------------------------------------------- seeded init, EMA, fit

def test_seeded_init_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = common.seeded_init(nn.Linear, 7, "init", "lin", in_features=4, out_features=2)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    b = common.seeded_init(nn.Linear, 7, "init", "lin", in_features=4, out_features=2)
    c = common.seeded_init(nn.Linear, 8, "init", "lin", in_features=4, out_features=2)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)


def test_ema_tracks_the_weights():
    net = nn.Linear(3, 1)
    ema = loops.EMA(net, rate=0.5, warmup=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
        start = ema.shadow.weight.clone()
    ema.update(net)
    torch.testing.assert_close(ema.shadow.weight, 0.5 * start + 0.5)
    for _ in range(40):
        ema.update(net)
    torch.testing.assert_close(ema.shadow.weight, torch.ones_like(start))
    assert not ema.shadow.weight.requires_grad
    # warm-up: the first updates use rate (1 + t)/(10 + t) < 0.999, so the average moves at once
    warm = loops.EMA(nn.Linear(3, 1), rate=0.999)
    before = warm.shadow.weight.clone()
    warm.update(net)
    torch.testing.assert_close(warm.shadow.weight, (2 / 11) * before + (9 / 11))


def _regression(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    return x, y


def test_fit_reduces_a_loss_records_epochs_and_keeps_an_ema():
    x, y = _regression()
    net = common.seeded_init(nn.Linear, 0, "test", in_features=4, out_features=1)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    ema = loops.EMA(net, 0.9)
    gen = torch.Generator().manual_seed(1)

    def step(idx):
        return nn.functional.mse_loss(net(x[idx]), y[idx]), {"n": float(len(idx))}

    hist = loops.fit(net, step, loops.epoch_batches(len(x), 50, 6, gen), optimizer=opt, ema=ema)
    assert len(hist.losses) == 6 * 6 and hist.epochs[0] == 0 and hist.epochs[-1] == 5
    assert hist.sizes[:6] == [50] * 5 + [6] and hist.stats["n"][5] == 6.0
    means = hist.epoch_means()
    assert len(means) == 6 and means[-1] < 0.2 * means[0]
    assert not net.training and hist.stopped is None
    assert not torch.equal(ema.shadow.weight, net.weight)


def test_fit_max_steps_stop_and_optimizer_switch():
    x, y = _regression()
    net = nn.Linear(4, 1)
    switch = loops.OptimizerSwitch(torch.optim.Adam(net.parameters(), lr=0.01), 3,
                                   lambda: torch.optim.SGD(net.parameters(), lr=0.0))
    seen = []

    def step(idx):
        seen.append(type(switch.current).__name__)
        return nn.functional.mse_loss(net(x[idx]), y[idx])

    gen = torch.Generator().manual_seed(0)
    hist = loops.fit(net, step, loops.random_batches(len(x), 32, 100, gen), optimizer=switch, max_steps=5)
    assert len(hist.losses) == 5 and seen == ["Adam", "Adam", "SGD", "SGD", "SGD"]

    def nan_step(idx):
        return net(x[idx]).sum() * float("nan")

    hist = loops.fit(net, nan_step, loops.random_batches(len(x), 32, 10, gen), optimizer=torch.optim.SGD(
        net.parameters(), lr=0.0), stop=loops.nonfinite_loss)
    assert len(hist.losses) == 1 and "non-finite" in hist.stopped


# ---------------------------------------------------------------- EBM chain starts

def test_chain_starts_banks_and_rejuvenation():
    data = 2 * torch.rand(20, 1, 4, 4) - 1
    gen = torch.Generator().manual_seed(0)
    ref = objectives.ChainStarts("persistent", data, gen)
    assert ref.bank.shape == data.shape  # one state per image by default
    x0, idx = ref.draw(data[:5])
    ref.put_back(idx, torch.zeros_like(x0))
    assert (ref.bank[idx] == 0).all()
    starts = objectives.ChainStarts("data_persistent", data, gen, rejuvenate=1.0, start_sigma=0.3, bank_size=8)
    assert starts.bank.shape == (8, 1, 4, 4) and starts.bank.min() >= -1 and starts.bank.max() <= 1
    starts.bank.fill_(5.0)
    x0, idx = starts.draw(data[:4])
    assert (x0 <= 1).all() and len(idx) == 4  # every drawn state restarted from (noisy) data
    exact = objectives.ChainStarts("data_persistent", data, gen)  # no start noise: training images
    assert any(torch.equal(exact.bank[0], d) for d in data)
    with pytest.raises(ValueError):
        objectives.ChainStarts("nope", data, gen)


def test_train_ebm_options_run_and_ema_replaces_the_weights():
    data = 2 * torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(3)) - 1
    nets = [common.seeded_init(ebm_nets.make_ebm, 0, "t", n_c=1, n_f=4, image_size=8) for _ in range(2)]
    kw = dict(n_steps=4, batch_size=16, lr_adam=1e-3, shortrun_steps=2, init="data_persistent", rejuvenate=0.5,
              start_sigma=0.2, bank_size=32, seed=0, log_every=0)
    plain = recipes.train_ebm(nets[0], data, **kw)
    averaged = recipes.train_ebm(nets[1], data, ema=0.9, **kw)
    assert plain["d"] == averaged["d"] and not plain["diverged"]  # the EMA does not feed back
    assert not torch.equal(nets[0].f[0].weight, nets[1].f[0].weight)


# ---------------------------------------------------------------- shared flags and the jobs

def test_data_args_are_spelled_one_way():
    p = argparse.ArgumentParser()
    common.add_data_args(p, eval_count=16)
    common.add_run_args(p, log_every=5)
    args = p.parse_args(["--data", "mnist", "--path", "/x"])
    assert common.splits(args) == ("t10k-fit", "t10k-holdout")
    assert (args.limit, args.eval_count, args.seed, args.threads, args.log_every) == (0, 16, 0, 0, 5)
    args = p.parse_args(["--split", "all", "--limit", "30", "--eval-count", "5"])
    x, y, held = common.load_data(args, held_out=True)
    assert x.shape == (30, 1, 8, 8) and len(y) == 30 and held.shape == (5, 1, 8, 8)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    for old in ("--data-dir", "--mnist-dir", "--start", "--count"):
        with pytest.raises(SystemExit):
            p.parse_args([old, "1"])
    with pytest.raises(SystemExit, match="no split"):
        common.load_data(p.parse_args(["--split", "t10k"]))


def test_every_job_help_runs_as_a_script(tmp_path):
    # from another folder, with no PYTHONPATH: the installed package is all a job needs
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    procs = {job: subprocess.Popen([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"], cwd=tmp_path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for job in JOBS}
    for job, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (job, err)
        assert "--data" in out and "--seed" in out, job
        if job != "calibrate_dae":
            assert "--path" in out and "--split" in out and "--out" in out, job


def test_train_classifier_job_end_to_end(tmp_path):
    from jobs import train_classifier
    from pipeline.registry import CLASSIFIERS

    out = str(tmp_path / "cnn.pt")
    assert train_classifier.main(["--data", "digits", "--out", out, "--epochs", "1", "--width", "8",
                                  "--limit", "256", "--seed", "3"]) == 0
    model = CLASSIFIERS.build("small_cnn", checkpoint=out)
    x, _ = common.load_images("digits", "test")
    assert model(x[:4]).shape == (4, 10)
    again = str(tmp_path / "again.pt")
    train_classifier.main(["--out", again, "--epochs", "1", "--width", "8", "--limit", "256", "--seed", "3"])
    a, b = torch.load(out, weights_only=True), torch.load(again, weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])  # seeded
    assert a["meta"]["split"] == "train" and a["meta"]["limit"] == 256



# ---------------------------------------------------------------- the EBM recipe and its loss
def test_recipe_settings_and_adam_schedule():
    import importlib.util
    from pathlib import Path

    from pipeline.train.recipes import EBM_RECIPES, adam_schedule

    spec = importlib.util.spec_from_file_location("train_ebm", Path(__file__).parents[1] / "jobs" / "train_ebm.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    args = job.parse_args(["--out", "x.pt", "--recipe", "digits", "--steps", "7", "--act", "leaky_relu"])
    cfg = job.settings(args)
    assert cfg["steps"] == 7 and cfg["act"] == "leaky_relu"  # flags over the recipe
    assert {k: cfg[k] for k in ("init", "bank_size", "shortrun_steps")} == \
        {k: EBM_RECIPES["digits"][k] for k in ("init", "bank_size", "shortrun_steps")}
    assert job.settings(job.parse_args(["--out", "x.pt"]))["init"] == "persistent"  # reference by default
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    at = adam_schedule(opt, 1e-3, 1e-4, 11)
    lrs = [at(t).param_groups[0]["lr"] for t in (1, 6, 11, 12)]
    torch.testing.assert_close(torch.tensor(lrs, dtype=torch.float64),
                               torch.tensor([1e-3, 10 ** -3.5, 1e-4, 1e-4], dtype=torch.float64))


def test_energy_dsm_loss_is_zero_exactly_for_the_ideal_energy():
    """Closed form: data at one point μ, one noise level σ — the ideal energy is
    E(x) = ‖x − μ‖² / (2σ²) (∇E(x̃) = n/σ), whose loss is 0; any other width is not."""
    from pipeline.train.objectives import energy_dsm_loss

    scale, sigma = 5e-5, 0.1
    mu = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)

    class Quadratic(torch.nn.Module):
        def __init__(self, width: float):
            super().__init__()
            self.width = width

        def forward(self, x):
            return scale * ((x - mu) ** 2).flatten(1).sum(1) / (2 * self.width ** 2)

    x = mu.expand(16, 1, 8, 8)
    ideal = energy_dsm_loss(Quadratic(sigma), x, (sigma, sigma), scale, torch.Generator().manual_seed(0))
    wrong = energy_dsm_loss(Quadratic(2 * sigma), x, (sigma, sigma), scale, torch.Generator().manual_seed(0))
    assert float(ideal.detach()) < 1e-6
    assert float(wrong.detach()) > 1.0  # ½‖n/2 − n‖² ≈ 64/8 = 8 per image
