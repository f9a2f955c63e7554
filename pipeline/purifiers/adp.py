"""ADP: adversarial purification with a score-based model (Yoon, Hwang, Lee, ICML 2021).

Per row (a (sample, replica) pair; the R replicas of a sample are the ADP ensemble):
  1. randomised smoothing x₀ = clip(x + σ·n, 0, 1), n ~ N(0, I) (σ = 0.25), or the
     "binary" variant x + σ·√(2/π)·(±1) of the reference code;
  2. map to the score grid x·255/256 + 1/512;
  3. up to `max_iter` (10) deterministic steps x ← clip(x + α·g, 0, 1) with g = s_θ(x) and
     the adaptive step α = clip(λδ/(1 − z), α_min, α_max), z = ⟨g, s_θ(x+δg)⟩/⟨g, g⟩
     (δ = 1e-3, λ = 0.05, α ∈ [1e-5, 1e-1]); a row stops for good the first time its α is
     ≤ stop_alpha (1e-3), and then stays fixed (batched with masks, never per-row loops);
  4. map back from the grid and clip to [0, 1].

Ensemble prediction over the R runs (Sec. 3.3: summed logits / summed softmax / majority
vote) is a decision rule of `pipeline.evaluation.decision` (mean_logit / mean_softmax / vote).
`ADPPurifier.trajectory` returns every intermediate step for "classify every step".

Differences from the reference code (jmyoon1/adp, purification/adp.py), on purpose:
- gradients flow (the reference runs under no_grad): the honest attack is full-gradient
  through both score evaluations per step, the step size and the clips;
- the reference maps from the grid back to [0, 1] after every step but never maps the
  result onto the grid again: from the second step on the network sees [0, 1]-scale
  inputs, and every step (stopped rows included) stretches the image by 256/255 about
  0.5. We stay on the grid for the whole loop and map back once; `regrid_each_step=True`
  reproduces the reference's behaviour.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from torch import nn

from pipeline.purifiers import steps
from pipeline.purifiers.base import Purified, Purifier, PurifierSettings
from pipeline.purifiers.nets import score_nets
from pipeline.purifiers.steps import AUTO_SEGMENT
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise


@dataclass(frozen=True)
class ADPSettings(PurifierSettings):
    """Settings of ADP (Yoon et al. 2021, arXiv:2106.06041). Paper: the values of Sec. 3.2–3.3
    and the reference code (jmyoon1/adp); ours: the rest.

    Arguments:
        sigma (float): std of the smoothing noise in [0, 1] image units, ≥ 0 (0 = none). Paper. (Default: 0.25)
        max_iter (int): maximum number of ascent steps, ≥ 0. Paper. (Default: 10)
        delta (float): probe distance δ of the step-size rule, > 0. Paper. (Default: 1e-3)
        lam (float): step-size factor λ. Paper. (Default: 0.05)
        alpha_min (float): lower clip of the step size α, > 0. Paper. (Default: 1e-5)
        alpha_max (float): upper clip of the step size α, ≥ alpha_min. Paper. (Default: 1e-1)
        stop_alpha (float): a row stops for good once its α ≤ stop_alpha. Paper. (Default: 1e-3)
        noise_type (str): "gaussian", or "binary" (±σ·√(2/π), the reference code's option). Paper. (Default: "gaussian")
        regrid_each_step (bool): reproduce the reference's per-step grid quirk (module
            docstring). Ours. (Default: False)
        checkpoint_segment (int): steps per gradient-checkpoint segment when a graph is
            needed (steps.run_steps): −1 memory-optimal, 0 off, k > 0 fixed. Memory only,
            values unchanged. Ours. (Default: −1)
        arch (str | None): expected arch of our checkpoint, or the arch of a published one
            ("ncsnv2"). Ours. (Default: None)
        net (Mapping | None): arch params of a published checkpoint (CIFAR-10 NCSNv2). Ours. (Default: None)
        ema (bool): load the EMA weights of a published NCSNv2 list. Ours. (Default: False)
    """

    sigma: float = 0.25
    max_iter: int = 10
    delta: float = 1e-3
    lam: float = 0.05
    alpha_min: float = 1e-5
    alpha_max: float = 1e-1
    stop_alpha: float = 1e-3
    noise_type: Literal["gaussian", "binary"] = "gaussian"
    regrid_each_step: bool = False
    checkpoint_segment: int = AUTO_SEGMENT
    arch: str | None = None
    net: Mapping[str, Any] | None = None
    ema: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("sigma", self.sigma >= 0, "≥ 0")
        self.require("max_iter", self.max_iter >= 0, "≥ 0")
        self.require("delta", self.delta > 0, "> 0")
        self.require("alpha_min", self.alpha_min > 0, "> 0")
        self.require("alpha_max", self.alpha_max >= self.alpha_min, f"≥ alpha_min ({self.alpha_min})")
        self.require("checkpoint_segment", self.checkpoint_segment >= -1, "≥ −1")


class ADPPurifier(Purifier):
    """ADP purification (Yoon et al. 2021, arXiv:2106.06041, Sec. 3.2–3.3): randomised
    smoothing, then score ascent with an adaptive step size.

    Stochastic (the smoothing noise), differentiable (full-gradient attack through both score
    evaluations per step), no test-time optimisation (a fixed, short ascent). nfe per row: 2
    score-network evaluations per step; the loop ends early once every row has stopped.
    Shapes: x [N, C, H, W] in [0, 1] → x̂ [N, C, H, W] in [0, 1]; stats: "steps" [N], the
    ascent steps each row took.

    Arguments:
        score_net (nn.Module): s_θ on the score grid, [N, C, H, W] → [N, C, H, W], frozen.
        settings (ADPSettings): see ADPSettings. (Default: ADPSettings(), the paper's)
        info (Mapping | None): facts about the network for the record (format, arch, ema). (Default: None)
    """

    stochastic = True
    differentiable = True
    test_time_optimization = False  # a fixed, short score ascent — no inner objective is optimised
    autocast_safe = False  # evaluation.precision bf16 keeps ADP fp32: its secant 1 − z is below bf16 resolution
    settings: ADPSettings

    def __init__(self, score_net: nn.Module, settings: ADPSettings = ADPSettings(),
                 info: Mapping[str, Any] | None = None):
        super().__init__(settings, {f"net_{k}": v for k, v in (info or {}).items() if k in ("format", "arch", "ema")})
        self.score_net = score_net

    # -- pieces ---------------------------------------------------------------------------

    def smooth(self, x: torch.Tensor, noise: Noise) -> torch.Tensor:
        """x₀ = clip(x + σ·n, 0, 1) with keyed n (Gaussian, or ±σ√(2/π) for "binary")."""
        if self.settings.sigma == 0:
            return x
        shape = tuple(x.shape[1:])
        if self.settings.noise_type == "gaussian":
            n = noise.normal(shape, purpose="adp/init").to(dtype=x.dtype)
        else:
            n = (2.0 * noise.randint(shape, purpose="adp/init", high=2) - 1.0).to(dtype=x.dtype)
            n = n * math.sqrt(2.0 / math.pi)
        return torch.clamp(x + self.settings.sigma * n, 0.0, 1.0)

    def _step(self, xg: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One ADP iteration: (x, active) → (x', active', α). x is on the score grid, except
        in regrid_each_step mode after the first step (the reference's pixel-space state)."""
        s = self.settings
        g = self.score_net(xg)
        g_probe = self.score_net(xg + s.delta * g)
        alpha = steps.adp_step_size(g, g_probe, s.delta, s.lam, s.alpha_min, s.alpha_max)
        active = active & (alpha > s.stop_alpha)
        if s.regrid_each_step:
            # reference: x ← clip(grid⁻¹(x + α·[active]·g), 0, 1) for every row, stopped or not
            a = (alpha * active.to(alpha.dtype)).view(-1, *([1] * (xg.dim() - 1)))
            xg = torch.clamp(steps.from_score_grid(xg + a * g), 0.0, 1.0)
        else:
            xg = steps.adp_update(xg, g, alpha, active, 0.0, 1.0)
        return xg, active, alpha

    def _segment(self, xg: torch.Tensor, active: torch.Tensor, n: int, keep_all: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to n iterations from (x, active) → (x, active, α [n', N], states [s, N, ...]).

        An iteration after which no row is active any more is not applied (nothing moves, and
        in regrid mode the reference would still map every row once); it ends the loop.
        states holds the pixel image after each applied iteration when keep_all (else empty).
        """
        alphas, states = [], []
        for _ in range(n):
            new_x, new_active, alpha = self._step(xg, active)
            alphas.append(alpha.detach())
            active = new_active
            if not bool(active.any()):  # every row has stopped: nothing moves any more
                break
            xg = new_x
            if keep_all:
                states.append(self._to_pixels(xg, not self.settings.regrid_each_step))
        stacked = torch.stack(states) if states else xg.new_zeros((0, *xg.shape))
        return xg, active, torch.stack(alphas), stacked

    def _iterate(self, x: torch.Tensor, noise: Noise | None, keep_all: bool
                 ) -> tuple[list[torch.Tensor], int, torch.Tensor]:
        """(images, nfe per row, steps taken per row [N]): images [x₀, …, final] with
        keep_all, else [final]."""
        x0 = self.smooth(x, self._noise(noise, x))
        xg = steps.to_score_grid(x0)
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        out = [x0] if keep_all else []
        size = self._segment_size(xg, active)
        use_ckpt = size > 0
        k = self.settings.max_iter
        size = size or k
        alphas: list[torch.Tensor] = []
        done, moved, stopped = 0, 0, False
        while done < k and not stopped:
            n = min(size, k - done)
            if use_ckpt:  # steps.checkpoint_segment: keeps (x, active) only, recomputes in backward
                seg = functools.partial(self._segment, n=n, keep_all=keep_all)
                xg, active, A, S = steps.checkpoint_segment(seg, xg, active)
            else:
                xg, active, A, S = self._segment(xg, active, n, keep_all)
            stopped = not bool(active.any())
            done += A.shape[0]
            moved += A.shape[0] - int(stopped)
            alphas.append(A.detach())
            out.extend(S.unbind(0))
        if not keep_all:
            out.append(self._to_pixels(xg, moved == 0 or not self.settings.regrid_each_step))
        return out, 2 * done, self._steps_taken(alphas, x)  # two score evaluations per iteration run

    def _segment_size(self, xg: torch.Tensor, active: torch.Tensor) -> int:
        """Iterations per checkpoint segment, 0 when not checkpointing (no graph needed or
        checkpoint_segment 0); −1 picks the memory-optimal length (steps.auto_segment) from
        the graph bytes of one iteration, measured once."""
        segment, k = self.settings.checkpoint_segment, self.settings.max_iter
        if segment == 0 or k == 0 or not steps.needs_graph(xg):
            return 0
        if segment > 0:
            return segment
        one = steps.step_graph_bytes(lambda x, _: self._step(x, active)[0], xg, 0)
        return steps.auto_segment(k, xg.numel() * xg.element_size(), one)

    def _steps_taken(self, alphas: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Steps taken per row [N]: the leading run of iterations with α > stop_alpha."""
        if not alphas:
            return torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        A = torch.cat(alphas)  # [T, N]
        return torch.cumprod((A > self.settings.stop_alpha).to(torch.int64), 0).sum(0)

    @staticmethod
    def _to_pixels(xg: torch.Tensor, on_grid: bool) -> torch.Tensor:
        return torch.clamp(steps.from_score_grid(xg), 0.0, 1.0) if on_grid else xg

    # -- interface ------------------------------------------------------------------------

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        images, nfe, taken = self._iterate(x, noise, keep_all=False)
        return Purified(images[-1], nfe, {"steps": taken})

    def trajectory(self, x: torch.Tensor, noise: Noise | None = None) -> list[torch.Tensor]:
        """[x₀ (smoothed input), x after step 1, …, final] in [0, 1]; the last entry equals
        forward(x, noise). Its length is 1 + the number of iterations actually applied (the
        loop ends early once every row has stopped)."""
        return self._iterate(x, noise, keep_all=True)[0]


@PURIFIERS.register("adp", settings=ADPSettings)
def build(checkpoint: str, settings: ADPSettings) -> ADPPurifier:
    """ADP score-based purification (Yoon et al. 2021); checkpoint from jobs/train_score.py
    or a published NCSNv2 checkpoint (settings arch/net give its architecture, ema picks EMA weights).

    Arguments:
        checkpoint (str): our score-network checkpoint or a published NCSNv2 one.
        settings (ADPSettings): see ADPSettings.
    """
    net = None if settings.net is None else dict(settings.net)
    score_net, info = score_nets.load_score_net(checkpoint, arch=settings.arch, arch_params=net, ema=settings.ema)
    return ADPPurifier(score_net, settings, info)
