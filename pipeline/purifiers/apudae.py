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

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from torch import nn

from pipeline.io import checkpoints, storage
from pipeline.purifiers import dae as dae_mod
from pipeline.purifiers.base import Purified, Purifier, PurifierSettings
from pipeline.purifiers.steps import adam_update, batch_free_sigmoid, straight_through
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise

log = logging.getLogger(__name__)

VARIANTS = ("adaptive", "simple", "distance")
# (steps, Adam lr) per variant, from the authors' script
VARIANT_DEFAULTS = {"adaptive": (13, 2.0 / 255), "simple": (12, 1.0 / 255), "distance": (16, 1.0 / 255)}
CALIB_SUFFIX = ".calib.json"


class CalibrationError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class APuDAESettings(PurifierSettings):
    """Settings of APuDAE (Kalaria et al. 2022, arXiv:2208.13838). Paper: the values of the
    authors' released script (utils.py); ours: the rest. Image units are [0, 1].

    Arguments:
        variant (str): "adaptive" (the paper's method), "simple" or "distance" (module
            docstring). Paper. (Default: "adaptive")
        calibration (str | None): μ/σ JSON from jobs/calibrate_dae.py; None =
            <checkpoint>.calib.json. Ours. (Default: None)
        mu (float | None): calibration mean of r(x); None = from the calibration file
            (needed unless variant="simple"). Ours (measured on our DAE). (Default: None)
        sigma (float | None): calibration std of r(x), > 0; None = from the calibration
            file (needed unless "simple"). Ours (measured on our DAE). (Default: None)
        steps (int | None): Adam steps, ≥ 0; None = the variant's 13 / 12 / 16. Paper. (Default: None)
        lr (float | None): Adam learning rate; None = the variant's 2/255, 1/255, 1/255. Paper. (Default: None)
        noise_eps (float): kick scale ε of the adaptive variant. Paper. (Default: 0.7/255)
        noise_max_factor (float): cap of the kick factor ((r − μ)/(2σ))². Paper. (Default: 4.0)
        noise_sigma_scale (float): the 2 in (r − μ)/(2σ), > 0. Paper. (Default: 2.0)
        noise_clip (tuple[float, float]): clip range of the kicked base image. Paper. (Default: (−1.0, 2.0))
        clip_recon (bool): clip D(z) to [0, 1] inside the loop (as in calibration). Ours. (Default: False)
        clip_output (bool): clip the output to [0, 1]. Ours. (Default: True)
        unrolled (bool): keep the graph of every Adam step (exact gradient). Ours. (Default: False)
        betas (tuple[float, float]): Adam β₁, β₂ in [0, 1). Adam's. (Default: (0.9, 0.999))
        adam_eps (float): Adam ε, > 0. Adam's. (Default: 1e-8)
    """

    variant: Literal["adaptive", "simple", "distance"] = "adaptive"
    calibration: str | None = None
    mu: float | None = None
    sigma: float | None = None
    steps: int | None = None
    lr: float | None = None
    noise_eps: float = 0.7 / 255
    noise_max_factor: float = 4.0
    noise_sigma_scale: float = 2.0
    noise_clip: tuple[float, float] = (-1.0, 2.0)
    clip_recon: bool = False
    clip_output: bool = True
    unrolled: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("sigma", self.sigma is None or self.sigma > 0, "> 0 or null")
        self.require("steps", self.steps is None or self.steps >= 0, "≥ 0 or null")
        self.require("lr", self.lr is None or self.lr > 0, "> 0 or null")
        self.require("noise_sigma_scale", self.noise_sigma_scale > 0, "> 0")
        self.require("noise_clip", self.noise_clip[0] <= self.noise_clip[1], "[low, high] with low ≤ high")
        self.require("betas", all(0 <= b < 1 for b in self.betas), "two values in [0, 1)")
        self.require("adam_eps", self.adam_eps > 0, "> 0")

    def resolved(self) -> "APuDAESettings":
        """steps and lr filled in from the variant where they are None."""
        steps, lr = VARIANT_DEFAULTS[self.variant]
        return dataclasses.replace(self, steps=steps if self.steps is None else self.steps,
                                   lr=lr if self.lr is None else self.lr)


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
    reconstruction error at x + δ, with adaptive kicks. nfe per row: one DAE evaluation per step.

    Flags: test-time optimisation always; stochastic for the `adaptive` variant (the kicks);
    differentiable only when `unrolled` (otherwise forward is straight-through, BPDA).
    Shapes: x [N, C, H, W] in [0, 1] → x̂ [N, C, H, W] (in [0, 1] when clip_output); no stats.

    Arguments:
        dae (nn.Module): the denoiser D, [N, C, H, W] → [N, C, H, W], frozen.
        settings (APuDAESettings): see APuDAESettings; mu and sigma must be set unless
            variant="simple" (the builder reads them from the calibration file).
        info (Mapping | None): facts about the DAE and calibration for the record. (Default: None)
    """

    test_time_optimization = True
    settings: APuDAESettings

    def __init__(self, dae: nn.Module, settings: APuDAESettings, info: Mapping[str, Any] | None = None):
        if settings.variant != "simple" and (settings.mu is None or settings.sigma is None):
            raise ValueError(f"APuDAE variant {settings.variant!r} needs the calibration μ and σ "
                             "(settings mu and sigma, or a calibration file through the builder)")
        super().__init__(settings.resolved(), info)
        self.dae = dae

    @property
    def stochastic(self) -> bool:  # the kicks of `adaptive` are random
        return self.settings.variant == "adaptive"

    @property
    def differentiable(self) -> bool:  # unrolled Adam: autograd is the true gradient
        return self.settings.unrolled

    def _loss(self, r: torch.Tensor) -> torch.Tensor:
        variant, mu, sigma = self.settings.variant, self.settings.mu, self.settings.sigma
        if variant == "simple":
            return r.sum()
        if variant == "adaptive":
            excess = (r > mu).to(r.dtype) * (r - mu)
            return (excess.pow(2) / sigma ** 2).sum()
        return (r * batch_free_sigmoid((r - mu) / sigma)).sum()

    def _kick_width(self, r: torch.Tensor) -> torch.Tensor:
        s = self.settings
        z = (r - s.mu) / (s.noise_sigma_scale * s.sigma)
        return s.noise_eps * z.pow(2).clamp(0.0, s.noise_max_factor)

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        s = self.settings
        unroll = s.unrolled and torch.is_grad_enabled() and x.requires_grad
        keyed = self._noise(noise, x) if s.variant == "adaptive" else None
        base = x if unroll else x.detach()
        delta = torch.zeros_like(base)
        m = torch.zeros_like(base)
        v = torch.zeros_like(base)
        bshape = (-1,) + (1,) * (x.dim() - 1)
        with torch.enable_grad():
            if unroll:
                delta.requires_grad_(True)
            for t in range(s.steps):
                if not unroll:
                    delta = delta.detach().requires_grad_(True)
                z = base + delta
                r = recon_error(self.dae, z, s.clip_recon)
                if keyed is not None:
                    u = keyed.uniform(tuple(x.shape[1:]), "apudae/adaptive", step=t,
                                      low=-1.0, high=1.0, dtype=x.dtype)
                    width = self._kick_width(r if unroll else r.detach()).view(bshape)
                    base = (base + width * u).clamp(*s.noise_clip)
                (g,) = torch.autograd.grad(self._loss(r), delta, create_graph=unroll)
                delta, m, v = adam_update(delta, g, m, v, t + 1, s.lr, s.betas, s.adam_eps)
                if not unroll:
                    delta, m, v = delta.detach(), m.detach(), v.detach()
        out = base + delta
        if s.clip_output:
            out = out.clamp(0.0, 1.0)
        return Purified(out if unroll else straight_through(x, out), s.steps)  # one r(z) per step


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


@PURIFIERS.register("apudae", settings=APuDAESettings)
def build(checkpoint: str, settings: APuDAESettings) -> APuDAEPurifier:
    """APuDAE: DAE-guided test-time purification (Kalaria et al. 2022), adaptive by default.

    DAE from jobs/train_dae.py; μ/σ from jobs/calibrate_dae.py (<checkpoint>.calib.json, or
    settings.calibration) unless settings mu and sigma are given (the simple variant needs neither).

    Arguments:
        checkpoint (str): our small_dae / rednet30 checkpoint (local path or URL).
        settings (APuDAESettings): see APuDAESettings.
    """
    dae, record = load_dae(checkpoint)
    info: dict[str, Any] = {"checkpoint": checkpoint, "arch": record["arch"]}
    if settings.variant != "simple" and (settings.mu is None or settings.sigma is None):
        url = settings.calibration or calibration_url(checkpoint)
        calib = load_calibration(url, checkpoint)
        settings = dataclasses.replace(settings, mu=calib["mu"] if settings.mu is None else settings.mu,
                                       sigma=calib["sigma"] if settings.sigma is None else settings.sigma)
        info["calibration"] = url
        log.info("APuDAE %s: μ=%.4g σ=%.4g from %s", settings.variant, settings.mu, settings.sigma, url)
    return APuDAEPurifier(dae, settings, info)
