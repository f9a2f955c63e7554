"""APuDAE — adaptive purification with a denoising autoencoder.

Kalaria, Hazra, Chakrabarti, "Towards Adversarial Purification using Denoising AutoEncoders",
NeurIPS 2022 ML Safety Workshop (arXiv 2208.13838). Our reading of the paper and of the
authors' released script (github.com/dvij542/ae-adversary-purifier, utils.py) — written
anew here, not copied:

A DAE D trained on Gaussian-noised clean images gives a reconstruction error
r(z) = ‖z − D(z)‖² (sum over pixels, per image). Calibration on clean held-out images gives
μ, σ of r(x) with D's output clipped to [0, 1] (jobs/calibrate_dae.py). Purification starts
from δ = 0 and runs Adam on δ (lr, steps per variant; Adam moments are per element, so rows
of a batch never interact). Each step t, at z = x_t + δ:

- ``adaptive`` (the paper's method; authors' ``refine_BIM_prob_individual``, 13 steps,
  lr 2/255): r = r(z); then the *base* image takes a uniform kick whose width grows with how
  atypical r is, x_{t+1} = clip(x_t + a·U[−1, 1], −1, 2) with
  a = ε·clip(((r − μ)/(2σ))², 0, 4), ε = 0.7/255;
  the loss is Σ_rows [(r > μ)(r − μ)]²/σ², computed at z before the kick. The kicks are
  applied every step and accumulate in the base; the output is x_T + δ_T. Rows whose r is
  at most μ get no gradient (δ stays 0) but still get the kicks.
- ``simple`` (authors' ``refine_BIM``, 12 steps, lr 1/255): loss Σ r.
- ``distance`` (authors' ``refine_BIM_biased_cont``, 16 steps, lr 1/255):
  loss Σ_rows r·sigmoid((r − μ)/σ). The script computes r over the whole batch at once; we
  use the per-image r of the paper so rows stay independent.

Inside the loop r uses D's raw output (the authors' script); `clip_recon=True` clips it as
in calibration. The output is clipped to [0, 1] (the script leaves it unclipped).

`unrolled=True` keeps the graph of every Adam step (create_graph), so autograd through
forward() is the exact gradient of the purification for the given noise draws — through the
DAE, the Adam updates and the kicks, whose width a depends on r (the script computes a from
a detached r; that changes no forward value, and we keep its gradient so the unrolled
derivative is the true one, checked against finite differences in the tests): the paper's
adaptive attack, to be used with EOT over the keyed kicks. Otherwise the inner optimisation
is detached and forward() is straight-through (identity backward), i.e. BPDA.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Sequence

import torch
from torch import nn

from pipeline.io import checkpoints, storage
from pipeline.purifiers import dae as dae_mod
from pipeline.purifiers.base import Purified, Purifier
from pipeline.purifiers.nets.dip_nets import batch_free_sigmoid
from pipeline.purifiers.steps import adam_update, straight_through
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise

log = logging.getLogger(__name__)

VARIANTS = ("adaptive", "simple", "distance")
# (steps, Adam lr) per variant, from the authors' script
VARIANT_DEFAULTS = {"adaptive": (13, 2.0 / 255), "simple": (12, 1.0 / 255), "distance": (16, 1.0 / 255)}
CALIB_SUFFIX = ".calib.json"


class CalibrationError(FileNotFoundError):
    pass


def recon_error(dae: nn.Module, z: torch.Tensor, clip: bool = False) -> torch.Tensor:
    """r(z) = ‖z − D(z)‖² per image: [N]. clip: clip D(z) to [0, 1] first.

    A batch of one runs as two identical rows whose errors are averaged: CPU convolutions
    give a row the same result (and gradient) in any batch of ≥ 2 rows but not in a batch of
    one, and a row must not depend on its batch. The average of two equal values is exact.
    """
    if z.shape[0] == 1:
        r2 = recon_error(dae, torch.cat([z, z]), clip)
        return (r2[:1] + r2[1:]) * 0.5
    recon = dae(z)
    if clip:
        recon = recon.clamp(0.0, 1.0)
    return (z - recon).pow(2).flatten(1).sum(1)


class APuDAEPurifier(Purifier):
    """APuDAE (Kalaria et al. 2022, arXiv:2208.13838): Adam on δ against the DAE's
    reconstruction error at x + δ, with adaptive kicks. One DAE evaluation per step and row.

    Flags: test-time optimisation always; stochastic for the `adaptive` variant (the kicks);
    differentiable only when `unrolled` (otherwise forward is straight-through, BPDA).

    Arguments:
        dae (nn.Module): the denoiser D, [N, C, H, W] → [N, C, H, W], frozen.
        variant (str): "adaptive", "simple" or "distance" (see the module docstring). (Default: "adaptive")
        mu (float | None): calibration mean of r(x); needed unless variant="simple". (Default: None)
        sigma (float | None): calibration std of r(x) (> 0); needed unless "simple". (Default: None)
        steps (int | None): Adam steps; None = the variant's (13 / 12 / 16). (Default: None)
        lr (float | None): Adam learning rate; None = the variant's (2/255, 1/255, 1/255). (Default: None)
        noise_eps (float): kick scale ε of the adaptive variant. (Default: 0.7/255)
        noise_max_factor (float): cap of the kick factor ((r − μ)/(2σ))². (Default: 4.0)
        noise_sigma_scale (float): the 2 in (r − μ)/(2σ). (Default: 2.0)
        noise_clip (Sequence[float]): clip range of the kicked base image. (Default: (-1.0, 2.0))
        clip_recon (bool): clip D(z) to [0, 1] inside the loop (as in calibration). (Default: False)
        clip_output (bool): clip the output to [0, 1]. (Default: True)
        unrolled (bool): keep the graph of every Adam step (exact gradient). (Default: False)
        betas (Sequence[float]): Adam β₁, β₂. (Default: (0.9, 0.999))
        adam_eps (float): Adam ε. (Default: 1e-8)
        info (dict | None): facts about the DAE and calibration for params(). (Default: None)
    """

    test_time_optimization = True

    def __init__(self, dae: nn.Module, *, variant: str = "adaptive", mu: float | None = None,
                 sigma: float | None = None, steps: int | None = None, lr: float | None = None,
                 noise_eps: float = 0.7 / 255, noise_max_factor: float = 4.0,
                 noise_sigma_scale: float = 2.0, noise_clip: Sequence[float] = (-1.0, 2.0),
                 clip_recon: bool = False, clip_output: bool = True, unrolled: bool = False,
                 betas: Sequence[float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 info: dict | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown APuDAE variant {variant!r}; expected one of {VARIANTS}")
        if variant != "simple" and (mu is None or sigma is None):
            raise ValueError(f"APuDAE variant {variant!r} needs the calibration μ and σ")
        if sigma is not None and not sigma > 0:
            raise ValueError(f"calibration σ must be > 0, got {sigma}")
        d_steps, d_lr = VARIANT_DEFAULTS[variant]
        self.dae = dae
        self.variant = variant
        self.mu = None if mu is None else float(mu)
        self.sigma = None if sigma is None else float(sigma)
        self.steps = int(d_steps if steps is None else steps)
        self.lr = float(d_lr if lr is None else lr)
        if self.steps < 0:
            raise ValueError(f"steps must be ≥ 0, got {self.steps}")
        self.noise_eps = float(noise_eps)
        self.noise_max_factor = float(noise_max_factor)
        self.noise_sigma_scale = float(noise_sigma_scale)
        lo, hi = (float(c) for c in noise_clip)
        self.noise_clip = (lo, hi)
        self.clip_recon = bool(clip_recon)
        self.clip_output = bool(clip_output)
        self.unrolled = bool(unrolled)
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = float(adam_eps)
        self.info = dict(info or {})

    @property
    def stochastic(self) -> bool:  # the kicks of `adaptive` are random
        return self.variant == "adaptive"

    @property
    def differentiable(self) -> bool:  # unrolled Adam: autograd is the true gradient
        return self.unrolled

    def params(self) -> dict[str, Any]:
        return {"variant": self.variant, "steps": self.steps, "lr": self.lr, "mu": self.mu,
                "sigma": self.sigma, "noise_eps": self.noise_eps,
                "noise_max_factor": self.noise_max_factor,
                "noise_sigma_scale": self.noise_sigma_scale, "noise_clip": list(self.noise_clip),
                "clip_recon": self.clip_recon, "clip_output": self.clip_output,
                "unrolled": self.unrolled, "betas": list(self.betas), "adam_eps": self.adam_eps,
                **self.info}

    def _loss(self, r: torch.Tensor) -> torch.Tensor:
        if self.variant == "simple":
            return r.sum()
        mu, sigma = self.mu, self.sigma
        if self.variant == "adaptive":
            excess = (r > mu).to(r.dtype) * (r - mu)
            return (excess.pow(2) / sigma ** 2).sum()
        return (r * batch_free_sigmoid((r - mu) / sigma)).sum()

    def _kick_width(self, r: torch.Tensor) -> torch.Tensor:
        z = (r - self.mu) / (self.noise_sigma_scale * self.sigma)
        return self.noise_eps * z.pow(2).clamp(0.0, self.noise_max_factor)

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        unroll = self.unrolled and torch.is_grad_enabled() and x.requires_grad
        keyed = self._noise(noise, x) if self.variant == "adaptive" else None
        base = x if unroll else x.detach()
        delta = torch.zeros_like(base)
        m = torch.zeros_like(base)
        v = torch.zeros_like(base)
        bshape = (-1,) + (1,) * (x.dim() - 1)
        with torch.enable_grad():
            if unroll:
                delta.requires_grad_(True)
            for t in range(self.steps):
                if not unroll:
                    delta = delta.detach().requires_grad_(True)
                z = base + delta
                r = recon_error(self.dae, z, self.clip_recon)
                if keyed is not None:
                    u = keyed.uniform(tuple(x.shape[1:]), "apudae/adaptive", step=t,
                                      low=-1.0, high=1.0, dtype=x.dtype)
                    width = self._kick_width(r if unroll else r.detach()).view(bshape)
                    base = (base + width * u).clamp(*self.noise_clip)
                (g,) = torch.autograd.grad(self._loss(r), delta, create_graph=unroll)
                delta, m, v = adam_update(delta, g, m, v, t + 1, self.lr, self.betas, self.adam_eps)
                if not unroll:
                    delta, m, v = delta.detach(), m.detach(), v.detach()
        out = base + delta
        if self.clip_output:
            out = out.clamp(0.0, 1.0)
        return Purified(out if unroll else straight_through(x, out), self.steps)  # one r(z) per step


# ---------------------------------------------------------------------------- loading

def load_dae(checkpoint: str) -> tuple[nn.Module, dict]:
    """A frozen denoiser and its checkpoint record (see `pipeline.purifiers.dae.load_denoiser_record`)."""
    return dae_mod.load_denoiser_record(checkpoint)


def calibration_url(checkpoint: str) -> str:
    return checkpoint + CALIB_SUFFIX


def calibrate(dae: nn.Module, images: torch.Tensor, clip: bool = True, batch_size: int = 256,
              cap: float | None = None) -> dict[str, float]:
    """μ, σ of r(x) = ‖x − clip(D(x), 0, 1)‖² over clean images [N, C, H, W] in [0, 1].

    cap: replace r > cap by the mean of the others (the authors replaced outliers of their
    CIFAR DAE by a constant); None keeps every value.
    """
    with torch.no_grad():
        r = torch.cat([recon_error(dae, images[i:i + batch_size], clip)
                       for i in range(0, len(images), batch_size)]).double()
    n_capped = 0
    if cap is not None:
        over = r > cap
        n_capped = int(over.sum())
        if n_capped and n_capped < len(r):
            r = torch.where(over, r[~over].mean(), r)
    if len(r) < 2:
        raise ValueError("calibration needs at least 2 images")
    return {"mu": float(r.mean()), "sigma": float(r.std(unbiased=True)), "n": int(len(r)),
            "clip_recon": bool(clip), "r_min": float(r.min()), "r_max": float(r.max()),
            "n_capped": n_capped}


def load_calibration(url: str, checkpoint: str | None = None) -> dict:
    if not storage.exists(url):
        raise CalibrationError(
            f"APuDAE calibration not found: {url}. Compute it with "
            f"`python jobs/calibrate_dae.py --checkpoint {checkpoint or '<checkpoint>'}` "
            "(or pass mu and sigma as purifier params).")
    calib = json.loads(storage.read_text(url))
    for key in ("mu", "sigma"):
        if not isinstance(calib.get(key), (int, float)) or not math.isfinite(calib[key]):
            raise ValueError(f"{url}: calibration lacks a finite {key!r}")
    if checkpoint is not None and calib.get("checkpoint_sha256"):
        digest = checkpoints.sha256(checkpoint)
        if digest != calib["checkpoint_sha256"]:
            raise ValueError(f"{url} was computed for another checkpoint (sha256 "
                             f"{calib['checkpoint_sha256'][:12]}…, {checkpoint} is {digest[:12]}…); "
                             "re-run jobs/calibrate_dae.py")
    return calib


@PURIFIERS.register("apudae")
def build(checkpoint: str, variant: str = "adaptive", calibration: str | None = None,
          mu: float | None = None, sigma: float | None = None, steps: int | None = None,
          lr: float | None = None, noise_eps: float = 0.7 / 255, noise_max_factor: float = 4.0,
          noise_sigma_scale: float = 2.0, noise_clip: Sequence[float] = (-1.0, 2.0),
          clip_recon: bool = False, clip_output: bool = True, unrolled: bool = False,
          betas: Sequence[float] = (0.9, 0.999), adam_eps: float = 1e-8) -> APuDAEPurifier:
    """APuDAE: DAE-guided test-time purification (Kalaria et al. 2022), adaptive by default.

    DAE from jobs/train_dae.py; μ/σ from jobs/calibrate_dae.py (<checkpoint>.calib.json)
    unless mu and sigma are given (the simple variant needs neither).

    Arguments:
        checkpoint (str): our small_dae / rednet30 checkpoint (local path or URL).
        calibration (str | None): μ/σ JSON; None = <checkpoint>.calib.json. (Default: None)
        The other arguments are APuDAEPurifier's, with its defaults.
    """
    dae, record = load_dae(checkpoint)
    info: dict[str, Any] = {"checkpoint": checkpoint, "arch": record["arch"]}
    if variant != "simple" and (mu is None or sigma is None):
        url = calibration or calibration_url(checkpoint)
        calib = load_calibration(url, checkpoint)
        mu = calib["mu"] if mu is None else mu
        sigma = calib["sigma"] if sigma is None else sigma
        info["calibration"] = url
        log.info("APuDAE %s: μ=%.4g σ=%.4g from %s", variant, mu, sigma, url)
    return APuDAEPurifier(dae, variant=variant, mu=mu, sigma=sigma, steps=steps, lr=lr,
                          noise_eps=noise_eps, noise_max_factor=noise_max_factor,
                          noise_sigma_scale=noise_sigma_scale, noise_clip=noise_clip,
                          clip_recon=clip_recon, clip_output=clip_output, unrolled=unrolled,
                          betas=betas, adam_eps=adam_eps, info=info)
