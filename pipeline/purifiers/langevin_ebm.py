"""Long-run Langevin purification with an EBM (Hill, Mitchell, Zhu, ICLR 2021).

Per row, on the [−1, 1] scale X = 2x − 1:
    X ← X − ∇_X U_θ(X) + ε·Z,   Z ~ N(0, I),   K = 1500 steps, ε = 0.01,
where U_θ is the network output, i.e. the energy with ε²/2 absorbed (the reference trains
U = (ε²/2)·E, so the Langevin step X − (ε²/2)∇E + εZ has no separate step size). No
clipping inside the chain, as in the reference. The result is mapped back to [0, 1] by
(X + 1)/2.

Clipping at the end: the reference (point0bar1/ebm-defense, bpda_eot_attack.py) feeds the
unclipped chain state to the classifier. Our classifiers normalise [0, 1] inputs with mean
0.5 / std 0.5 inside, so `clip_output=False` hands them exactly the reference's input;
`clip_output=True` (the default, to honour the purifier contract x̂ ∈ [0, 1]) clips.

EOT defense: the H = 150 chains per image are the pipeline's R runs (evaluation.runs);
predict with `pipeline.evaluation.decision.decide(logits, "mean_logit")` (the reference's
eot_defense_ave "logits"; "mean_softmax" and "mean_log_softmax" are its other two options).

Gradients: forward is differentiable (stochastic=True, differentiable=True,
test_time_optimization=False: a sampler, not an optimiser), so a full-gradient attack can
backpropagate through all K steps — second-order, through ∇U. With a graph needed, the
chain runs in checkpointed segments (steps.checkpoint_segment; by default of the
memory-optimal length √(K·state/step graph)), so activation memory is one segment's graph
plus one state per segment, and the compute overhead is one graph-free forward pass
(docs/performance.md). The reference paper attacks it with BPDA+EOT; both are available to
the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from pipeline.purifiers import steps
from pipeline.purifiers.base import Purified, Purifier, PurifierSettings
from pipeline.purifiers.nets import ebm_nets
from pipeline.purifiers.steps import AUTO_SEGMENT
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise


@dataclass(frozen=True)
class LangevinEBMSettings(PurifierSettings):
    """Settings of long-run Langevin purification (Hill et al. 2021, arXiv:2005.13525).
    Paper: K and ε of Sec. 4 (CIFAR-10); ours: the rest.

    Arguments:
        steps (int): Langevin steps K, ≥ 0. Paper. (Default: 1500)
        eps (float): noise scale ε on the [−1, 1] scale, ≥ 0. Paper. (Default: 0.01)
        clip_output (bool): clip (X + 1)/2 to [0, 1]; False hands the classifier the
            reference's unclipped state. Ours. (Default: True)
        checkpoint_segment (int): steps per gradient-checkpoint segment when a graph is
            needed (steps.run_steps): −1 memory-optimal, 0 off, k > 0 fixed. Memory only,
            values unchanged. Ours. (Default: −1)
        net (Mapping | None): arch params of a published state dict (CIFAR-10 EBM). Ours. (Default: None)
    """

    steps: int = 1500
    eps: float = 0.01
    clip_output: bool = True
    checkpoint_segment: int = AUTO_SEGMENT
    net: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("steps", self.steps >= 0, "≥ 0")
        self.require("eps", self.eps >= 0, "≥ 0")
        self.require("checkpoint_segment", self.checkpoint_segment >= -1, "≥ −1")


class LangevinEBMPurifier(Purifier):
    """Long-run Langevin purification (Hill et al. 2021, arXiv:2005.13525, Eq. 2): K steps
    X ← X − ∇U(X) + ε·Z on X = 2x − 1. nfe per row: one energy gradient per step.

    Stochastic, differentiable (second-order through ∇U), no test-time optimisation.
    Shapes: x [N, C, H, W] in [0, 1] → x̂ [N, C, H, W] (in [0, 1] when clip_output); no stats.

    Arguments:
        energy_net (nn.Module): U_θ, [N, C, H, W] on [−1, 1] → [N] (energy × ε²/2), frozen.
        settings (LangevinEBMSettings): see LangevinEBMSettings. (Default: the paper's)
        info (Mapping | None): facts about the network for the record (format, arch). (Default: None)
    """

    stochastic = True
    differentiable = True
    test_time_optimization = False
    settings: LangevinEBMSettings

    def __init__(self, energy_net: nn.Module, settings: LangevinEBMSettings = LangevinEBMSettings(),
                 info: Mapping[str, Any] | None = None):
        super().__init__(settings, {f"net_{k}": v for k, v in (info or {}).items() if k in ("format", "arch")})
        self.energy_net = energy_net

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """U_θ of images in [0, 1] (per row), for diagnostics."""
        return self.energy_net(2.0 * x - 1.0)

    def _chain(self, X: torch.Tensor, noise: Noise, n_steps: int, start: int = 0) -> torch.Tensor:
        shape = tuple(X.shape[1:])

        def step(Xt: torch.Tensor, t: int) -> torch.Tensor:
            grad = steps.energy_grad(self.energy_net, Xt)
            z = noise.normal(shape, purpose="langevin_ebm/z", step=t).to(dtype=Xt.dtype)
            return steps.langevin_step(Xt, grad, self.settings.eps, z)

        return steps.run_steps(step, X, n_steps, segment=self.settings.checkpoint_segment, start=start)

    def _to_pixels(self, X: torch.Tensor) -> torch.Tensor:
        x = (X + 1.0) * 0.5
        return torch.clamp(x, 0.0, 1.0) if self.settings.clip_output else x

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        noise = self._noise(noise, x)
        k = self.settings.steps
        return Purified(self._to_pixels(self._chain(2.0 * x - 1.0, noise, k)), k)

    def trajectory(self, x: torch.Tensor, noise: Noise | None = None, every: int = 100) -> list[torch.Tensor]:
        """States after 0, every, 2·every, …, K steps (mapped to pixels); the last entry
        equals forward(x, noise) — the same keyed draws are used step by step."""
        noise = self._noise(noise, x)
        X = 2.0 * x - 1.0
        out, done = [self._to_pixels(X)], 0
        while done < self.settings.steps:
            n = min(every, self.settings.steps - done)
            X = self._chain(X, noise, n, start=done)
            done += n
            out.append(self._to_pixels(X))
        return out


@PURIFIERS.register("langevin_ebm", settings=LangevinEBMSettings)
def build(checkpoint: str, settings: LangevinEBMSettings) -> LangevinEBMPurifier:
    """Long-run Langevin EBM purification (Hill et al. 2021); checkpoint from
    jobs/train_ebm.py or a published ebm.pth state dict (settings.net: its architecture params).

    Arguments:
        checkpoint (str): our EBM checkpoint or a published plain state dict.
        settings (LangevinEBMSettings): see LangevinEBMSettings.
    """
    net = None if settings.net is None else dict(settings.net)
    energy_net, info = ebm_nets.load_ebm(checkpoint, arch_params=net)
    return LangevinEBMPurifier(energy_net, settings, info)
