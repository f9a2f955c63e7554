"""DiffPure: diffusion purification (Nie, Guo, Huang, Xiao, Vahdat, Anandkumar, ICML 2022).

Per row (a (sample, replica) pair), on the [−1, 1] scale X = 2x − 1:
  1. diffuse to level L = round(t*·N): X = √ᾱ_{L−1}·X + √(1 − ᾱ_{L−1})·z with the discrete
     ᾱ (N = 1000, β 0.1 → 20), as the official code (runners/diffpure_sde.py);
  2. `sde` (default): Euler–Maruyama on the reverse VP-SDE from t* to 1e-5, dt = 1e-3
     (100 steps at t* = 0.1); `ode`: Euler on the probability-flow ODE on the same grid;
     `ddpm`: L ancestral steps of guided-diffusion's p_sample (the GuidedDiffusion route);
  3. x̂ = (X + 1)/2, clipped to [0, 1].
The math is in `vpsde`; this module holds the loop, the noise, the gradients and the loading.

Two score conventions, both as a `ScoreModel` whose forward(x, t) returns the network's ε
(its learned-σ channels kept, split off by `split_eps`), the score being −ε/√(1 − ᾱ(t)):
- `ScoreSDEModel`: score_sde continuous VP models (label 999·t; score = −output/σ(t));
- `EpsilonModel`: guided-diffusion ε-models and ours (integer step ⌊N·t⌋).

Gradients. `gradient_method: exact` backpropagates through the unrolled solver, in
checkpointed segments (steps.run_steps: √n-step segments, so activation memory grows as √n;
the gradient of the discrete scheme exactly). `adjoint`: torchsde's stochastic adjoint (`sdeint_adjoint`, as
DiffPure's own evaluation), with the Brownian path built from the same keyed increments
(`KeyedBrownian`), so the forward values equal `exact`'s and the gradient differs only by
the adjoint SDE's own discretisation. BPDA and the surrogate process (Lee & Kim 2023: a
coarser dt for the gradient) come from the attack's `gradient:` and `surrogate:` settings.
`fixed_noise_seed` holds every draw fixed (the same for every row and call): the
deterministic diagnostic of Liu et al. (ICLR 2025) that shows how much robustness is the
randomness.

Networks (`network`): ours (nets/small_unet.py), score_sde's DDPM++ (nets/ncsnpp.py) and
guided-diffusion's U-Net (nets/guided_unet.py), each in its convention.

Deliberate differences from the official code: n equal solver steps instead of torchsde's
dt-steps with a short last one (vpsde's module doc; < 1e-5 in every time point); every draw
keyed per row (pipeline.seeding) instead of the global generator, so replicas batch and a
row's purification does not depend on its batch. docs/diffpure.md has the rest.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import extras
from pipeline.io.checkpoints import CheckpointError
from pipeline.purifiers import steps, vpsde
from pipeline.purifiers.base import Purified, Purifier, PurifierSettings, load_frozen
from pipeline.purifiers.steps import AUTO_SEGMENT
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Score conventions
# ---------------------------------------------------------------------------------------


class ScoreModel(nn.Module):
    """A diffusion network in one convention: forward(x [N, C, H, W] on [−1, 1], t) → ε
    prediction [N, C or 2C, H, W] (2C: learned-σ values in the second half).

    Subclasses map the continuous time t ∈ (0, 1] to the network's own label."""

    def __init__(self, net: nn.Module, schedule: vpsde.VPSchedule | None = None):
        super().__init__()
        self.net = net
        self.schedule = schedule or vpsde.VPSchedule()

    def label(self, t: float) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        labels = self.label(t).to(x.device).expand(x.shape[0])
        return self.net(x, labels)

    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """∇log p_t(x) = −ε/√(1 − ᾱ(t)) (continuous ᾱ, as the official code for both)."""
        return split_eps(self(x, t), x.shape[1])[0] / -self.schedule.sigma(t)


class ScoreSDEModel(ScoreModel):
    """score_sde continuous VP models (NCSN++/DDPM++ `*_continuous`): label 999·t, and
    the score −output/σ(t) (score_sde's get_score_fn for a continuous VPSDE)."""

    def label(self, t: float) -> torch.Tensor:
        return torch.tensor([999.0 * t], dtype=torch.float32)


class EpsilonModel(ScoreModel):
    """ε-prediction models on integer steps (guided-diffusion, ours): step ⌊N·t⌋, computed
    in float32 as the official `_scale_timesteps`, capped at N − 1."""

    def label(self, t: float) -> torch.Tensor:
        step = (torch.tensor([t], dtype=torch.float32) * self.schedule.n_steps).long()
        return step.clamp(0, self.schedule.n_steps - 1)


def split_eps(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ε, learned-σ fraction (v + 1)/2 or None): guided-diffusion's learned range."""
    if out.shape[1] == channels:
        return out, None
    if out.shape[1] == 2 * channels:
        return out[:, :channels], (out[:, channels:] + 1.0) * 0.5
    raise ValueError(f"score network returned {out.shape[1]} channels for {channels}-channel images "
                     f"(expected {channels}, or {2 * channels} with learned σ)")


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffPureSettings(PurifierSettings):
    """Settings of DiffPure (Nie et al. 2022, arXiv:2205.07460). Defaults: the paper's
    CIFAR-10 ℓ∞ run (t* 0.075 for ℓ2; 0.15 for ImageNet with sampler ddpm or sde).

    Arguments:
        t_star (float): diffusion time t* in (0, 1]; the level is round(t*·N). Paper. (Default: 0.1)
        sampler (str): "sde" (Euler–Maruyama, the paper's), "ode" (probability flow, its
            ablation) or "ddpm" (ancestral, the official GuidedDiffusion route). Paper. (Default: "sde")
        dt (float): solver step of sde/ode, in (0, t*]; a coarser dt in an attack's
            `surrogate` is Lee & Kim's surrogate process. Paper. (Default: 1e-3)
        t_end (float): where sde/ode stop, in [0, t*). Official code. (Default: 1e-5)
        beta_min (float): the VP-SDE's β(0), > 0. Paper. (Default: 0.1)
        beta_max (float): the VP-SDE's β(1), > beta_min. Paper. (Default: 20.0)
        n_train_steps (int): N of the discrete schedule, ≥ 2. Paper. (Default: 1000)
        gradient_method (str): "exact" (through the unrolled solver, checkpointed) or
            "adjoint" (torchsde's stochastic adjoint, sampler sde only, as the paper's
            evaluation). Ours / paper. (Default: "exact")
        checkpoint_segment (int): steps per checkpoint segment when a graph is needed
            (steps.run_steps): −1 memory-optimal, 0 off, k > 0 fixed. Memory only, values
            unchanged. Ours. (Default: −1)
        fixed_noise_seed (int | None): hold every draw fixed, the same for every row and
            call: the deterministic diagnostic of Liu et al. (ICLR 2025). Ours. (Default: None)
        resize (int | None): purify at resize×resize, ≥ 8 (bilinear there and back; 256 for
            ImageNet 224 px inputs, as the official evaluation). Paper. (Default: None)
        clip_output (bool): clip x̂ to [0, 1]. Ours. (Default: True)
        network (str): what the checkpoint holds: "ours" (small_unet from
            jobs/train_diffusion.py, ε-model), "score_sde" (score_sde's continuous VP DDPM++,
            e.g. cifar10_ddpmpp_deep_continuous checkpoint_8.pth, score convention) or
            "guided_diffusion" (e.g. 256x256_diffusion_uncond.pt, ε-model with learned σ).
            Paper's networks. (Default: "ours")
        net (Mapping | None): arch params of a published network when not the published
            configuration (nets/ncsnpp.py, nets/guided_unet.py); null for our network. Ours. (Default: None)
        dtype (str): "float32" or "bfloat16" for a published network's weights (inputs and
            outputs stay float32). Ours. (Default: "float32")
    """

    t_star: float = 0.1
    sampler: Literal["sde", "ode", "ddpm"] = "sde"
    dt: float = 1e-3
    t_end: float = 1e-5
    beta_min: float = 0.1
    beta_max: float = 20.0
    n_train_steps: int = 1000
    gradient_method: Literal["exact", "adjoint"] = "exact"
    checkpoint_segment: int = AUTO_SEGMENT
    fixed_noise_seed: int | None = None
    resize: int | None = None
    clip_output: bool = True
    network: Literal["ours", "score_sde", "guided_diffusion"] = "ours"
    net: Mapping[str, Any] | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("t_star", 0 < self.t_star <= 1, "in (0, 1]")
        self.require("dt", 0 < self.dt <= self.t_star, "in (0, t_star]")
        self.require("t_end", 0 <= self.t_end < self.t_star, "in [0, t_star)")
        self.require("beta_min", self.beta_min > 0, "> 0")
        self.require("beta_max", self.beta_max > self.beta_min, "> beta_min")
        self.require("n_train_steps", self.n_train_steps >= 2, "≥ 2")
        self.require("t_star", round(self.t_star * self.n_train_steps) >= 1,
                     "at least level 1 (t_star·n_train_steps ≥ 0.5)")
        self.require("gradient_method", self.gradient_method == "exact" or self.sampler == "sde",
                     "'exact' with sampler ode or ddpm (adjoint needs sampler sde: torchsde's stochastic adjoint)")
        self.require("checkpoint_segment", self.checkpoint_segment >= -1, "≥ −1 (−1 auto, 0 off)")
        if self.gradient_method == "adjoint":   # known when the config is read, before any work
            extras.require("torchsde")
        self.require("resize", self.resize is None or self.resize >= 8, "null or ≥ 8")
        self.require("net", self.net is None or self.network != "ours",
                     "null with network 'ours' (our checkpoint holds its arch params)")
        self.require("dtype", self.dtype == "float32" or self.network != "ours",
                     "'float32' with network 'ours'")

    def schedule(self) -> vpsde.VPSchedule:
        return vpsde.VPSchedule(self.beta_min, self.beta_max, self.n_train_steps)


# ---------------------------------------------------------------------------------------
# The purifier
# ---------------------------------------------------------------------------------------


class DiffPurePurifier(Purifier):
    """DiffPure (Nie et al. 2022, arXiv:2205.07460, Eq. 3–4): diffuse to t*, then solve the
    reverse VP-SDE (or ODE, or DDPM ancestral chain) back to 0.

    Stochastic unless `fixed_noise_seed` is set (attack with EOT, evaluate over R runs);
    differentiable (full gradient through the solver, exact or adjoint); no test-time
    optimisation. nfe per row: the solver steps (100 at t* = 0.1, dt = 1e-3; round(t*·N)
    for ddpm). Shapes: x [N, C, H, W] in [0, 1] → x̂ [N, C, H, W] (in [0, 1] when
    clip_output). No stats: every row runs the same fixed process.

    Arguments:
        score_model (ScoreModel): the network in its convention (ScoreSDEModel, EpsilonModel), frozen.
        settings (DiffPureSettings): see DiffPureSettings. (Default: the paper's CIFAR-10 ℓ∞)
        info (Mapping | None): facts about the network for the record (format, arch, convention). (Default: None)
    """

    differentiable = True
    test_time_optimization = False
    settings: DiffPureSettings

    def __init__(self, score_model: ScoreModel, settings: DiffPureSettings = DiffPureSettings(),
                 info: Mapping[str, Any] | None = None):
        keep = ("format", "arch", "convention", "dtype", "ema")
        super().__init__(settings, {f"net_{k}": v for k, v in (info or {}).items() if k in keep})
        self.score_model = score_model
        sched = settings.schedule()
        self._sched = sched
        self._abar = sched.alphas_cumprod()
        self._level = sched.level(settings.t_star)
        self._grid = vpsde.time_grid(settings.t_star, settings.dt, settings.t_end)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.settings.fixed_noise_seed is None

    @property
    def n_steps(self) -> int:
        """Solver steps (= network evaluations per row)."""
        return self._level if self.settings.sampler == "ddpm" else len(self._grid)

    # -- noise and scale ------------------------------------------------------------------

    def _draws(self, noise: Noise | None, x: torch.Tensor) -> Noise:
        seed = self.settings.fixed_noise_seed
        if seed is None:
            return self._noise(noise, x)
        key = Noise.for_batch(seed, ["diffpure/fixed"], "diffpure/fixed", 1, x.device).row_keys
        return Noise(key.expand(x.shape[0], 2).contiguous())

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        size = self.settings.resize
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def _to_pixels(self, X: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        x = (X + 1.0) * 0.5
        if tuple(x.shape[-2:]) != tuple(shape[-2:]):
            x = F.interpolate(x, size=tuple(shape[-2:]), mode="bilinear", align_corners=False)
        return x.clamp(0.0, 1.0) if self.settings.clip_output else x

    # -- the process ----------------------------------------------------------------------

    def diffuse(self, X: torch.Tensor, noise: Noise) -> torch.Tensor:
        """Step 1: X at level L with the discrete ᾱ_{L−1} (keyed forward noise)."""
        z = noise.normal(tuple(X.shape[1:]), "diffpure/diffuse").to(X.dtype)
        return vpsde.diffuse(X, float(self._abar[self._level - 1]), z)

    def _step_fn(self, noise: Noise, shape: tuple[int, ...]) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """step(X, k) of the chosen sampler; deterministic given (X, k): keyed draws only."""
        sched, sampler = self._sched, self.settings.sampler
        if sampler == "ddpm":
            abar = self._abar

            def ddpm(X: torch.Tensor, k: int) -> torch.Tensor:
                i = self._level - 1 - k
                eps, frac = split_eps(self.score_model(X, (i + 0.5) / sched.n_steps), X.shape[1])
                z = noise.normal(shape, "diffpure/ddpm", step=k).to(X.dtype)
                return vpsde.ddpm_step(X, eps, abar, i, z, frac)
            return ddpm

        def reverse(X: torch.Tensor, k: int) -> torch.Tensor:
            t, h = self._grid[k]
            eps = split_eps(self.score_model(X, t), X.shape[1])[0]
            score = eps / -sched.sigma(t)
            if sampler == "ode":
                return vpsde.reverse_ode_step(X, score, sched.beta(t), h)
            z = noise.normal(shape, "diffpure/dw", step=k).to(X.dtype)
            return vpsde.reverse_sde_step(X, score, sched.beta(t), h, z)
        return reverse

    def solve(self, X: torch.Tensor, noise: Noise) -> torch.Tensor:
        """Step 2 from the diffused X: the chosen sampler, with the chosen gradient."""
        if self.settings.gradient_method == "adjoint" and steps.needs_graph(X):
            return _adjoint_solve(self, X, noise)
        step = self._step_fn(noise, tuple(X.shape[1:]))
        return steps.run_steps(step, X, self.n_steps, segment=self.settings.checkpoint_segment)

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        draws = self._draws(noise, x)
        X = self.diffuse(self._to_model(x), draws)
        return Purified(self._to_pixels(self.solve(X, draws), x.shape), self.n_steps)


# ---------------------------------------------------------------------------------------
# The stochastic adjoint (torchsde), on the keyed Brownian path
# ---------------------------------------------------------------------------------------


def _torchsde() -> Any:
    extras.require("torchsde")
    import torchsde

    return torchsde


def _adjoint_solve(purifier: DiffPurePurifier, X: torch.Tensor, noise: Noise) -> torch.Tensor:
    """The reverse SDE by torchsde.sdeint_adjoint (method euler, DiffPure's call) in the
    reversed time s = 1 − t, on the flattened state [N, C·H·W] as torchsde needs."""
    torchsde = _torchsde()
    grid = purifier._grid
    s0, h = 1.0 - grid[0][0], grid[0][1]
    s1 = s0 + h * len(grid)
    shape = tuple(X.shape[1:])
    bm = _keyed_brownian_class(torchsde)(noise, shape, s0, h, len(grid), X.dtype)
    sde = _ReverseVPSDE(purifier.score_model, purifier._sched, shape)
    ts = torch.tensor([s0, s1], dtype=torch.float64, device=X.device)
    ys = torchsde.sdeint_adjoint(sde, X.flatten(1), ts, method="euler", dt=h, bm=bm, adjoint_params=())
    return ys[-1].view_as(X)


class _ReverseVPSDE(nn.Module):
    """The reverse VP-SDE in torchsde's form: dy = [½β(t)y + β(t)s(y, t)] ds + √β(t) dW,
    t = 1 − s (DiffPure's RevVPSDE)."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, model: ScoreModel, sched: vpsde.VPSchedule, shape: tuple[int, ...]):
        super().__init__()
        self.model, self.sched, self.shape = model, sched, shape

    def f(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = 1.0 - float(s)
        eps = split_eps(self.model(y.view(-1, *self.shape).to(torch.float32), t), self.shape[0])[0]
        score = (eps / -self.sched.sigma(t)).flatten(1).to(y.dtype)
        beta = self.sched.beta(t)
        return 0.5 * beta * y + beta * score

    def g(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, math.sqrt(self.sched.beta(1.0 - float(s))))


@functools.lru_cache(maxsize=1)
def _keyed_brownian_class(torchsde: Any) -> type:
    class KeyedBrownian(torchsde.BaseBrownian):
        """W on the solver grid s_k = s0 + k·h from the keyed increments √h·z_k: W(tb) − W(ta)
        for grid-aligned ta, tb (what Euler asks forward, and the adjoint asks in reverse).
        The same z_k as DiffPurePurifier's exact loop, so both solve the same path."""

        def __init__(self, noise: Noise, shape: tuple[int, ...], s0: float, h: float, n: int, dtype: torch.dtype):
            self.noise, self.shape_, self.s0, self.h, self.n, self.dtype_ = noise, shape, s0, h, n, dtype
            self.cache: dict[int, torch.Tensor] = {}

        def _index(self, s: float) -> int:
            k = (s - self.s0) / self.h
            if abs(k - round(k)) > 1e-4 or not -1e-4 <= k <= self.n + 1e-4:
                raise RuntimeError(f"KeyedBrownian: time {s} is off the solver grid s0={self.s0}, h={self.h}")
            return int(round(k))

        def _dw(self, k: int) -> torch.Tensor:
            if k not in self.cache:
                z = self.noise.normal(self.shape_, "diffpure/dw", step=k).to(self.dtype_)
                self.cache[k] = (math.sqrt(self.h) * z).flatten(1)
            return self.cache[k]

        def __call__(self, ta, tb=None, return_U=False, return_A=False):  # noqa: N803 (torchsde's API)
            if tb is None or return_U or return_A:
                raise RuntimeError("KeyedBrownian gives increments W(tb) − W(ta) only")
            a, b = self._index(float(ta)), self._index(float(tb))
            lo, hi, sign = (a, b, 1.0) if a <= b else (b, a, -1.0)
            if lo == hi:
                return torch.zeros_like(self._dw(0))
            return sign * sum(self._dw(k) for k in range(lo, hi))

        def __repr__(self) -> str:
            return f"KeyedBrownian(s0={self.s0}, h={self.h}, n={self.n})"

        @property
        def dtype(self) -> torch.dtype:
            return self.dtype_

        @property
        def device(self) -> torch.device:
            return self.noise.device

        @property
        def shape(self) -> tuple[int, ...]:
            return (self.noise.rows, math.prod(self.shape_))

        @property
        def levy_area_approximation(self) -> str:
            return "none"

    return KeyedBrownian


# ---------------------------------------------------------------------------------------
# Loading and registration
# ---------------------------------------------------------------------------------------


def load_score_model(checkpoint: str, settings: DiffPureSettings) -> tuple[ScoreModel, dict]:
    """The checkpoint's network in its convention, frozen: ours and guided-diffusion as
    EpsilonModel, score_sde as ScoreSDEModel. Published files load with weights_only=True."""
    sched, arch_params = settings.schedule(), None if settings.net is None else dict(settings.net)
    if settings.network == "score_sde":
        from pipeline.purifiers.nets import ncsnpp

        net, info = ncsnpp.load_score_sde(checkpoint, arch_params=arch_params, dtype=settings.dtype)
        return ScoreSDEModel(net, sched), {**info, "convention": "score_sde"}
    if settings.network == "guided_diffusion":
        from pipeline.purifiers.nets import guided_unet

        net, info = guided_unet.load_guided_diffusion(checkpoint, arch_params=arch_params, dtype=settings.dtype)
        return EpsilonModel(net, sched), {**info, "convention": "epsilon"}
    from pipeline.purifiers.nets import small_unet

    try:
        net, info = load_frozen(checkpoint, small_unet.make, archs=small_unet.ARCHS, kind="diffusion network")
    except CheckpointError as err:
        raise CheckpointError(f"{err} (diffpure network 'ours'; for a published score_sde or guided-diffusion "
                              "file set purifier.params.network: score_sde or guided_diffusion)") from None
    return EpsilonModel(net, sched), {**info, "convention": "epsilon"}


@PURIFIERS.register("diffpure", settings=DiffPureSettings)
def build(checkpoint: str, settings: DiffPureSettings) -> DiffPurePurifier:
    """DiffPure diffusion purification (Nie et al. 2022); ours, score_sde or guided-diffusion networks.

    Arguments:
        checkpoint (str): the network (settings.network says which kind): ours from
            jobs/train_diffusion.py, score_sde's checkpoint_8.pth, or 256x256_diffusion_uncond.pt.
        settings (DiffPureSettings): see DiffPureSettings.
    """
    model, info = load_score_model(checkpoint, settings)
    return DiffPurePurifier(model, settings, info)
