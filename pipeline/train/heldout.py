"""Checks a training job runs on held-out images after fitting: does the model denoise?

Evaluation only (no attack differentiates through these), so `torch.no_grad()` is used
here where the purifier's own math does not need gradients. Noise is keyed by the job
seed, so a check is reproducible.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.evaluation.decision import decide
from pipeline.purifiers import steps
from pipeline.seeding import Noise, config_seed
from pipeline.train.loops import psnr


def _heldout_noise(seed: int, n: int, context: str) -> Noise:
    return Noise.for_batch(seed, [f"heldout{i}" for i in range(n)], context)


def dae_report(net: nn.Module, held: torch.Tensor, sigma: float, seed: int, batch_size: int = 256) -> dict:
    """MSE and PSNR of the noisy (clip(x + σn, 0, 1)) and of the denoised held-out images."""
    gen = torch.Generator().manual_seed(config_seed(seed, "dae_eval_noise"))
    noisy = (held + sigma * torch.randn(held.shape, generator=gen)).clamp(0, 1)
    with torch.no_grad():
        den = torch.cat([net(noisy[i:i + batch_size]) for i in range(0, len(noisy), batch_size)]).clamp(0, 1)
    return {"eval_sigma": sigma, "heldout_mse_noisy": float((noisy - held).pow(2).mean()),
            "heldout_mse_denoised": float((den - held).pow(2).mean()),
            "heldout_psnr_noisy": psnr(noisy, held), "heldout_psnr_denoised": psnr(den, held)}


def adp_psnr(model: nn.Module, images: torch.Tensor, seed: int = 0) -> list[float]:
    """PSNR (dB) against the clean images after each ADP step with the paper's settings:
    [smoothed input x₀, step 1, …, final]. Freezes `model`."""
    from pipeline.purifiers.adp import ADPPurifier

    for q in model.parameters():
        q.requires_grad_(False)
    purifier = ADPPurifier(model)
    with torch.no_grad():  # evaluation only: no attack gradients needed here
        traj = purifier.trajectory(images, _heldout_noise(seed, len(images), "train_score/eval"))
    return [psnr(t, images) for t in traj]


def noisy(images: torch.Tensor, sigma: float, seed: int, context: str) -> torch.Tensor:
    """clip(x + σ·n, 0, 1) with n from a generator keyed by (seed, context): the same noisy
    held-out set for every model compared."""
    gen = torch.Generator().manual_seed(config_seed(seed, context))
    return (images + sigma * torch.randn(images.shape, generator=gen)).clamp(0, 1)


def langevin_psnr(net: nn.Module, images: torch.Tensor, sigma: float, n_steps: int, eps: float,
                  every: int, seed: int = 0) -> list[tuple[int, float, float]]:
    """Long-run Langevin purification (the `langevin_ebm` purifier itself) of held-out images
    with Gaussian noise σ added and clipped to [0, 1]: [(steps, PSNR dB against the clean
    images, mean energy)] every `every` steps. Freezes `net`."""
    from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier, LangevinEBMSettings

    for q in net.parameters():
        q.requires_grad_(False)
    start = noisy(images, sigma, seed, "train_ebm/eval")
    purifier = LangevinEBMPurifier(net, LangevinEBMSettings(steps=n_steps, eps=eps))
    # the chain needs ∇U, so no no_grad around it; the parameters are frozen above
    traj = purifier.trajectory(start, _heldout_noise(seed, len(images), f"train_ebm/eval/{sigma:g}"), every=every)
    out = []
    for i, x in enumerate(traj):
        with torch.no_grad():
            out.append((min(i * every, n_steps), psnr(x, images), float(purifier.energy(x).mean())))
    return out


def psnr_verdict(curve: list[tuple[int, float, float]], slack_db: float = 1.0) -> dict:
    """Purification, not drift: the final PSNR beats the start and is within `slack_db` of the
    best point of the curve (`langevin_psnr` output)."""
    best = max(curve, key=lambda c: c[1])
    start, final = curve[0][1], curve[-1][1]
    return {"start_db": start, "final_db": final, "best_db": best[1], "best_step": best[0],
            "improves": final > start, "near_best": final >= best[1] - slack_db,
            "passed": final > start and final >= best[1] - slack_db}


def langevin_retention(net: nn.Module, classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                       labels: torch.Tensor, n_steps: int, eps: float, chains: int, seed: int = 0,
                       rows: int = 1024) -> dict:
    """Chains started at clean held-out images: does the class survive K steps?

    Runs `chains` keyed chains per image (the EOT defense's H) with the `langevin_ebm`
    purifier and returns the bare classifier's accuracy on the clean images, on every chain
    state after K steps (per chain) and by the mean logits over the H chains (EOT defense),
    with the images' and the chain states' mean energies. Freezes `net`."""
    from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier, LangevinEBMSettings

    for q in net.parameters():
        q.requires_grad_(False)
    n = len(images)
    purifier = LangevinEBMPurifier(net, LangevinEBMSettings(steps=n_steps, eps=eps))
    noise = Noise.for_batch(seed, [f"heldout{i}" for i in range(n)], "train_ebm/retention", chains)
    # rows are (image, chain) pairs, image-major, as the pipeline's R runs
    out = steps.purify_in_chunks(purifier.purify, images.repeat_interleave(chains, 0), noise, rows).images
    with torch.no_grad():
        clean = torch.cat([classify(images[i:i + rows]) for i in range(0, n, rows)]).argmax(1)
        logits = torch.cat([classify(out[i:i + rows]) for i in range(0, len(out), rows)]).view(n, chains, -1)
        e_data, e_chain = purifier.energy(images), purifier.energy(out).view(n, chains)
    per_chain = logits.argmax(2) == labels[:, None]
    return {"images": n, "chains": chains, "steps": n_steps, "eps": eps,
            "clean_correct": int((clean == labels).sum()),
            "chain_correct": int(per_chain.sum()), "chain_total": int(per_chain.numel()),
            "eot_correct": int((decide(logits, "mean_logit") == labels).sum()),
            "energy_data": float(e_data.mean()), "energy_chain": float(e_chain.mean()),
            # per-image drop of the energy (data − chain mean), for a standard error
            "energy_drop_se": float((e_data - e_chain.mean(1)).std() / max(1, n) ** 0.5)}
