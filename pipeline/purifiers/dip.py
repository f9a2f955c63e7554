"""Deep Image Prior defense with decision-boundary analysis.

Ding, Wang, Ding, Yuan, Wang, Huang, Wang, "Delving into Deep Image Prior for Adversarial
Defense: A Novel Reconstruction-based Defense Framework", ACM MM 2021 (arXiv 2108.00180).
Training-free. Our implementation of the steps the paper describes (its exact settings are
not available to us; every choice below is a parameter, documented in docs/apudae_dip.md):

1. Fit: per image, a randomly initialised skip encoder–decoder f_θ maps a fixed random code z
   to the (adversarial) input x; Adam on ‖f_θ(z + reg-noise) − x‖² for `iterations` steps.
   DIP fits low frequencies first, so early reconstructions lie near the image manifold and
   keep the clean class, while later ones take in the adversarial pattern.
2. Decision space: every `check_every` iterations the reconstruction goes through the
   classifier (prediction and logits).
3. Cross-boundary detection: y_early is the most frequent label of the early records
   (iterations `warmup` … `warmup + early_window`), the low-frequency reconstructions. If it
   differs from y_adv, the classifier's label of x, the crossing is the last record labelled
   y_early (a later record has left y_early's region). No crossing (y_early = y_adv, as for
   a clean input, or the trajectory never leaves y_early) → `fallback`.
   `detection="last_switch"` is the looser alternative: the last record not labelled y_adv
   followed only by y_adv records (catches more attacks, also flags some clean inputs).
4. On-boundary localisation: bisection (`bisect_steps`) on the segment between the
   reconstructions before and after the crossing, on the margin of y_early's region,
   max_{k≠y_early} logit_k − logit_{y_early}; x_on is the point on y_early's side.
5. Purification: move x_on against the adversarial direction,
   x_push = x_on − push·(x − x_on).
6. Stitching: the output is the mean of x_push and the `stitch_window` last on-manifold
   reconstructions before the crossing, clipped to [0, 1].

Throughput: the N images of a batch train N independent networks together (stacked
parameters, grouped convolutions, element-wise Adam), see nets/dip_nets.py. All randomness
(code, per-iteration input noise, network initialisation) comes from the keyed `noise`.

Flags: stochastic (random code and init), not differentiable (forward is straight-through:
identity backward), test-time optimisation → the honest attack is BPDA + EOT.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from pipeline.purifiers.base import Purified, Purifier, PurifierSettings, freeze
from pipeline.purifiers.nets.dip_nets import StackedSkipNet
from pipeline.purifiers.steps import adam_update, purify_in_chunks, straight_through
from pipeline.registry import CLASSIFIERS, PURIFIERS
from pipeline.seeding import Noise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DIPSettings(PurifierSettings):
    """Settings of the DIP defense (Ding et al. 2021, arXiv:2108.00180). The paper gives the
    method but not its settings: every value below is ours (docs/apudae_dip.md), except
    Adam's betas and eps (Kingma & Ba) and the settings marked Ulyanov et al.'s, from their
    Deep Image Prior (arXiv:1711.10925). Iterations count DIP fitting steps; images are in [0, 1].

    Arguments:
        classifier (str): registered name of the classifier whose decisions the method
            analyses (steps 2–4; its checkpoint is the builder's `classifier_checkpoint`). Ours. (Default: "small_cnn")
        classifier_params (Mapping | None): extra classifier builder params. Ours. (Default: None)
        iterations (int): DIP fitting steps, ≥ 1. Ours. (Default: 300)
        lr (float): Adam learning rate of the fit, > 0. Ulyanov et al.'s. (Default: 0.01)
        check_every (int): record and classify every this many iterations, ≥ 1. Ours. (Default: 2)
        warmup (int): records before this iteration are ignored by detection, ≥ 0. Ours. (Default: 30)
        code_channels (int): channels of the random code z, ≥ 1. Ours. (Default: 16)
        code_scale (float): z ~ U[0, code_scale), ≥ 0. Ours. (Default: 0.1)
        reg_noise_std (float): std of the per-iteration noise added to z, ≥ 0. Ulyanov et al.'s. (Default: 1/30)
        down (tuple[int, ...]): channels of the encoder levels (one entry per level).
            Ours (Ulyanov et al.'s skip net, narrower for 28×28). (Default: (16, 16, 16))
        up (tuple[int, ...] | None): channels of the decoder levels; None = down. Ours. (Default: None)
        skip (int | tuple[int, ...]): channels of the skip connections (one per level, or
            one for all). Ours. (Default: 4)
        kernel (int): convolution kernel size, odd. Ulyanov et al.'s. (Default: 3)
        upsample (str): "bilinear" or "nearest". Ulyanov et al.'s. (Default: "bilinear")
        pad_mode (str): convolution padding, "reflect", "replicate" or "zeros". Ulyanov et al.'s. (Default: "reflect")
        bisect_steps (int): bisection steps of the boundary localisation, ≥ 0. Ours. (Default: 8)
        push (float): x_push = x_on − push·(x − x_on). Ours. (Default: 0.5)
        stitch_window (int): on-manifold reconstructions averaged with x_push, ≥ 0. Ours. (Default: 2)
        early_window (int): iterations after warmup whose records define y_early, ≥ 0. Ours. (Default: 50)
        fallback (str): output without a crossing, "last" (reconstruction) or "input". Ours. (Default: "last")
        detection (str): "early" (the paper's reading) or "last_switch". Ours. (Default: "early")
        chunk_rows (int): rows fitted together, ≥ 1; memory of the recorded trace only,
            values unchanged. Ours. (Default: 64)
        betas (tuple[float, float]): Adam β₁, β₂ in [0, 1). Adam's. (Default: (0.9, 0.999))
        adam_eps (float): Adam ε, > 0. Adam's. (Default: 1e-8)
    """

    classifier: str = "small_cnn"
    classifier_params: Mapping[str, Any] | None = None
    iterations: int = 300
    lr: float = 0.01
    check_every: int = 2
    warmup: int = 30
    code_channels: int = 16
    code_scale: float = 0.1
    reg_noise_std: float = 1.0 / 30
    down: tuple[int, ...] = (16, 16, 16)
    up: tuple[int, ...] | None = None
    skip: int | tuple[int, ...] = 4
    kernel: int = 3
    upsample: Literal["bilinear", "nearest"] = "bilinear"
    pad_mode: Literal["reflect", "replicate", "zeros"] = "reflect"
    bisect_steps: int = 8
    push: float = 0.5
    stitch_window: int = 2
    early_window: int = 50
    fallback: Literal["last", "input"] = "last"
    detection: Literal["early", "last_switch"] = "early"
    chunk_rows: int = 64
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("iterations", "check_every", "code_channels", "chunk_rows"):
            self.require(name, getattr(self, name) >= 1, "≥ 1")
        for name in ("warmup", "code_scale", "reg_noise_std", "bisect_steps", "stitch_window", "early_window"):
            self.require(name, getattr(self, name) >= 0, "≥ 0")
        self.require("lr", self.lr > 0, "> 0")
        levels = len(self.down)
        self.require("down", levels >= 1 and min(self.down) >= 1, "a non-empty list of channel counts ≥ 1")
        self.require("up", self.up is None or len(self.up) == levels, f"null or a list of {levels} (one per level)")
        self.require("skip", isinstance(self.skip, int) or len(self.skip) == levels,
                     f"an integer or a list of {levels} (one per level)")
        self.require("kernel", self.kernel >= 1 and self.kernel % 2 == 1, "odd and ≥ 1")
        self.require("betas", all(0 <= b < 1 for b in self.betas), "two values in [0, 1)")
        self.require("adam_eps", self.adam_eps > 0, "> 0")

    def net_kwargs(self) -> dict[str, Any]:
        """The skip network's shape, StackedSkipNet's keywords."""
        return {"down": list(self.down), "up": None if self.up is None else list(self.up),
                "skip": self.skip if isinstance(self.skip, int) else list(self.skip),
                "kernel": self.kernel, "upsample": self.upsample, "pad_mode": self.pad_mode}


@dataclass
class DIPTrace:
    iterates: torch.Tensor   # [K, N, C, H, W] recorded reconstructions
    steps: torch.Tensor      # [K] iteration index (1-based) of each record
    logits: torch.Tensor     # [K, N, classes]
    nfe: int = 0             # network evaluations per row: DIP fits + classifier calls


def find_crossing(preds: torch.Tensor, y_adv: torch.Tensor, first: int = 0,
                  early_end: int | None = None, num_classes: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-boundary record per row: (j [N], y_early [N]); j = −1 where there is none.

    preds [K, N]: labels of the recorded reconstructions; records first … early_end − 1 are
    the early (low-frequency) ones. y_early is their most frequent label (ties: the smallest).
    j is the last record labelled y_early, provided y_early ≠ y_adv (the input's own label)
    and some later record left y_early; a trajectory that stays in y_early, or whose early
    label already is the input's, has no crossing.
    """
    K, N = preds.shape
    early_end = K if early_end is None else min(max(early_end, first + 1), K)
    if first >= K:
        none = torch.full((N,), -1, dtype=torch.long, device=preds.device)
        return none, none.clone()
    k = int(num_classes) if num_classes is not None else int(preds.max()) + 1
    counts = torch.nn.functional.one_hot(preds[first:early_end], k).sum(0)      # [N, k]
    y_early = counts.argmax(1)
    in_early = preds == y_early.view(1, N)
    idx = torch.arange(K, device=preds.device).view(K, 1).expand(K, N)
    j = torch.where(in_early, idx, torch.full_like(idx, -1)).max(0).values
    ok = (y_early != y_adv) & (j < K - 1) & (j >= first)
    return torch.where(ok, j, torch.full_like(j, -1)), y_early


def find_last_switch(preds: torch.Tensor, y_adv: torch.Tensor, first: int = 0) -> torch.Tensor:
    """The alternative rule ("last_switch"): j [N] is the last record (≥ first) not labelled
    y_adv, provided every later record is labelled y_adv; −1 where there is none."""
    K, N = preds.shape
    is_adv = preds == y_adv.view(1, N)
    idx = torch.arange(K, device=preds.device).view(K, 1).expand(K, N)
    j = torch.where(~is_adv, idx, torch.full_like(idx, -1)).max(0).values
    ok = is_adv[-1] & (j >= first)
    return torch.where(ok, j, torch.full_like(j, -1))


def localize_boundary(classify: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor,
                      b: torch.Tensor, y_ref: torch.Tensor,
                      steps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Bisection on the segment a → b for the boundary of class y_ref's decision region.

    Margin m(z) = max_{k ≠ y_ref} logit_k(z) − logit_{y_ref}(z); a [N, ...] has m ≤ 0 (labelled
    y_ref) and b has m > 0. Returns (α [N], x_on [N, ...]) with x_on = a + α(b − a) the last
    point found inside y_ref's region; |α − α*| ≤ 2^−steps for a single crossing.
    """
    n = a.shape[0]
    lo = torch.zeros(n, dtype=a.dtype, device=a.device)
    hi = torch.ones(n, dtype=a.dtype, device=a.device)
    shape = (-1,) + (1,) * (a.dim() - 1)
    rows = torch.arange(n, device=a.device)
    for _ in range(int(steps)):
        mid = (lo + hi) / 2
        logits = classify(a + mid.view(shape) * (b - a))
        own = logits[rows, y_ref]
        others = logits.scatter(1, y_ref.view(-1, 1), float("-inf")).max(1).values
        outside = others - own > 0
        hi = torch.where(outside, mid, hi)
        lo = torch.where(outside, lo, mid)
    return lo, a + lo.view(shape) * (b - a)


def push_away(x_on: torch.Tensor, x_adv: torch.Tensor, push: float) -> torch.Tensor:
    """Move the on-boundary image against the adversarial direction (x_adv − x_on)."""
    return x_on - push * (x_adv - x_on)


class DIPPurifier(Purifier):
    """DIP defense with decision-boundary analysis (Ding et al. 2021, arXiv:2108.00180).

    Stochastic (random code and init), not differentiable (forward is straight-through),
    test-time optimisation: the honest attack is BPDA + EOT. nfe per row counts the DIP
    network evaluations (`iterations`) and the classifier calls (records, y_adv, bisection).
    Shapes: x [N, C, H, W] in [0, 1] → x̂ [N, C, H, W] in [0, 1]; stats, each [N]:
    "crossed" (bool), "crossing_step" (iteration of the crossing record, −1 none), "alpha"
    (boundary position on the crossing segment, NaN none), "y_input" (the classifier's label
    of x) and "y_early" (the early reconstructions' label).

    Arguments:
        classifier (nn.Module): logits of images in [0, 1], frozen (decision space, steps 2–4).
        settings (DIPSettings): see DIPSettings. (Default: DIPSettings())
        info (Mapping | None): facts about the classifier for the record. (Default: None)
    """

    stochastic = True
    differentiable = False
    test_time_optimization = True
    settings: DIPSettings

    def __init__(self, classifier: nn.Module, settings: DIPSettings = DIPSettings(),
                 info: Mapping[str, Any] | None = None):
        super().__init__(settings, info)
        self.classifier = classifier

    def _classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z.detach())

    def network(self, channels: int) -> StackedSkipNet:
        return StackedSkipNet(self.settings.code_channels, channels, **self.settings.net_kwargs())

    def fit(self, x: torch.Tensor, noise: Noise) -> DIPTrace:
        """Run the N DIP optimisations together; record reconstructions and their logits."""
        s = self.settings
        x = x.detach()
        n, c, h, w = x.shape
        net = self.network(c)
        params = net.init_params(noise, x.dtype)
        code_shape = (s.code_channels, h, w)
        z = noise.uniform(code_shape, "dip/code", dtype=x.dtype) * s.code_scale
        names = list(params)
        m = {k: torch.zeros_like(p) for k, p in params.items()}
        v = {k: torch.zeros_like(p) for k, p in params.items()}
        iterates, steps, logits = [], [], []
        with torch.enable_grad():
            for t in range(s.iterations):
                zin = z
                if s.reg_noise_std > 0:
                    zin = z + s.reg_noise_std * noise.normal(code_shape, "dip/reg", step=t, dtype=x.dtype)
                leaves = {k: params[k].detach().requires_grad_(True) for k in names}
                out = net(leaves, zin)
                loss = (out - x).pow(2).flatten(1).mean(1).sum()
                grads = torch.autograd.grad(loss, [leaves[k] for k in names])
                for k, g in zip(names, grads):
                    params[k], m[k], v[k] = adam_update(leaves[k].detach(), g, m[k], v[k], t + 1,
                                                        s.lr, s.betas, s.adam_eps)
                if (t + 1) % s.check_every == 0 or t + 1 == s.iterations:
                    rec = out.detach()
                    iterates.append(rec)
                    steps.append(t + 1)
                    logits.append(self._classify(rec).detach())
        # per row: one network evaluation per iteration, one classifier call per record
        return DIPTrace(torch.stack(iterates), torch.tensor(steps), torch.stack(logits),
                        nfe=s.iterations + len(steps))

    def _detect(self, y_adv: torch.Tensor, trace: DIPTrace) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3: (j [N], y_early [N]), j the crossing record (−1: none)."""
        s = self.settings
        preds = trace.logits.argmax(-1)                                  # [K, N]
        first = int((trace.steps < s.warmup).sum())                      # first record ≥ warmup
        if s.detection == "early":
            early_end = int((trace.steps < s.warmup + s.early_window).sum())
            return find_crossing(preds, y_adv, first, early_end, trace.logits.shape[-1])
        j = find_last_switch(preds, y_adv, first)
        return j, preds[j.clamp(min=0), torch.arange(preds.shape[1], device=preds.device)]

    def purify_trace(self, x: torch.Tensor, trace: DIPTrace) -> Purified:
        """Steps 3–6 on a recorded trajectory: x [N, ...] → Purified(x̂ [N, ...] in [0, 1],
        classifier calls per row, stats)."""
        s = self.settings
        x = x.detach()
        n = x.shape[0]
        rows = torch.arange(n, device=x.device)
        y_adv = self._classify(x).argmax(1)
        j, y_early = self._detect(y_adv, trace)
        crossed = j >= 0
        out = trace.iterates[-1].clone() if s.fallback == "last" else x.clone()
        alpha = torch.full((n,), float("nan"), dtype=x.dtype, device=x.device)
        if crossed.any():
            r = rows[crossed]
            jr = j[crossed]
            before, after = trace.iterates[jr, r], trace.iterates[jr + 1, r]
            a_r, x_on = localize_boundary(self._classify, before, after, y_early[r], s.bisect_steps)
            pieces = [push_away(x_on, x[r], s.push)]
            for back in range(s.stitch_window):
                pieces.append(trace.iterates[(jr - back).clamp(min=0), r])
            out[r] = torch.stack(pieces).mean(0)
            alpha[r] = a_r
        step = torch.where(crossed, trace.steps.to(j.device)[j.clamp(min=0)], torch.full_like(j, -1))
        stats = {"crossed": crossed, "crossing_step": step, "alpha": alpha, "y_input": y_adv, "y_early": y_early}
        calls = 1 + (s.bisect_steps if bool(crossed.any()) else 0)  # y_adv, then the bisection
        return Purified(out.clamp(0.0, 1.0), calls, stats)

    def _purify_rows(self, x: torch.Tensor, noise: Noise) -> Purified:
        trace = self.fit(x, noise)
        out = self.purify_trace(x, trace)
        return Purified(out.images, trace.nfe + out.nfe, out.stats)

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        keyed = self._noise(noise, x)
        x0 = x.detach()
        if x0.shape[0] == 0:
            return Purified(x, 0)
        # rows are independent and batch-free, so chunks (which bound the memory of the
        # recorded trajectory: records × rows × pixels) do not change the result
        out = purify_in_chunks(self._purify_rows, x0, keyed, self.settings.chunk_rows)
        return Purified(straight_through(x, out.images), out.nfe, out.stats)  # identity backward (BPDA)


@PURIFIERS.register("dip", settings=DIPSettings, checkpoint="classifier_checkpoint")
def build(checkpoint: str, settings: DIPSettings) -> DIPPurifier:
    """Deep Image Prior defense with boundary analysis (Ding et al. 2021); needs the classifier.

    Arguments:
        checkpoint (str): the classifier's checkpoint (params key `classifier_checkpoint`):
            the classifier under attack, whose decisions the method analyses.
        settings (DIPSettings): see DIPSettings.
    """
    params = dict(settings.classifier_params or {})
    clf = freeze(CLASSIFIERS.build(settings.classifier, checkpoint=checkpoint, **params))
    return DIPPurifier(clf, settings, {"classifier_checkpoint": checkpoint})
