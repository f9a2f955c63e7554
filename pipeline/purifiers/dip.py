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
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pipeline.purifiers.base import Purified, Purifier, freeze
from pipeline.purifiers.nets.dip_nets import StackedSkipNet
from pipeline.purifiers.steps import adam_update, purify_in_chunks, straight_through
from pipeline.registry import CLASSIFIERS, PURIFIERS
from pipeline.seeding import Noise

log = logging.getLogger(__name__)

FALLBACKS = ("last", "input")
DETECTIONS = ("early", "last_switch")


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

    Arguments:
        classifier (nn.Module): logits of images in [0, 1], frozen (decision space, steps 2–4).
        iterations (int): DIP fitting steps (≥ 1). (Default: 300)
        lr (float): Adam learning rate of the fit. (Default: 0.01)
        check_every (int): record and classify every this many iterations (≥ 1). (Default: 2)
        warmup (int): records before this iteration are ignored by detection. (Default: 30)
        code_channels (int): channels of the random code z. (Default: 16)
        code_scale (float): z ~ U[0, code_scale). (Default: 0.1)
        reg_noise_std (float): std of the per-iteration noise added to z. (Default: 1/30)
        down (Sequence[int]): channels of the encoder levels. (Default: (16, 16, 16))
        up (Sequence[int] | None): channels of the decoder levels; None = down. (Default: None)
        skip (Sequence[int] | int): channels of the skip connections. (Default: 4)
        kernel (int): convolution kernel size. (Default: 3)
        upsample (str): "bilinear" or "nearest". (Default: "bilinear")
        pad_mode (str): convolution padding mode. (Default: "reflect")
        bisect_steps (int): bisection steps of the boundary localisation. (Default: 8)
        push (float): x_push = x_on − push·(x − x_on). (Default: 0.5)
        stitch_window (int): on-manifold reconstructions averaged with x_push. (Default: 2)
        early_window (int): iterations after warmup whose records define y_early. (Default: 50)
        fallback (str): output without a crossing, "last" or "input". (Default: "last")
        detection (str): "early" or "last_switch". (Default: "early")
        chunk_rows (int): rows fitted together (memory of the recorded trace). (Default: 64)
        betas (Sequence[float]): Adam β₁, β₂. (Default: (0.9, 0.999))
        adam_eps (float): Adam ε. (Default: 1e-8)
        info (dict | None): facts about the classifier for params(). (Default: None)
    """

    stochastic = True
    differentiable = False
    test_time_optimization = True

    def __init__(self, classifier: nn.Module, *, iterations: int = 300, lr: float = 0.01,
                 check_every: int = 2, warmup: int = 30, code_channels: int = 16,
                 code_scale: float = 0.1, reg_noise_std: float = 1.0 / 30,
                 down: Sequence[int] = (16, 16, 16), up: Sequence[int] | None = None,
                 skip: Sequence[int] | int = 4, kernel: int = 3, upsample: str = "bilinear",
                 pad_mode: str = "reflect", bisect_steps: int = 8, push: float = 0.5,
                 stitch_window: int = 2, early_window: int = 50, fallback: str = "last",
                 detection: str = "early", chunk_rows: int = 64,
                 betas: Sequence[float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 info: dict | None = None):
        super().__init__()
        if detection not in DETECTIONS:
            raise ValueError(f"detection must be one of {DETECTIONS}, got {detection!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        if iterations < 1 or check_every < 1:
            raise ValueError("iterations and check_every must be ≥ 1")
        self.classifier = classifier
        self.iterations, self.lr, self.check_every = int(iterations), float(lr), int(check_every)
        self.warmup = int(warmup)
        self.code_channels, self.code_scale = int(code_channels), float(code_scale)
        self.reg_noise_std = float(reg_noise_std)
        self.net_kwargs = {"down": [int(c) for c in down], "up": None if up is None else [int(c) for c in up],
                           "skip": skip if isinstance(skip, int) else [int(c) for c in skip],
                           "kernel": int(kernel), "upsample": upsample, "pad_mode": pad_mode}
        StackedSkipNet(self.code_channels, 1, **self.net_kwargs)  # validate now
        self.bisect_steps, self.push = int(bisect_steps), float(push)
        self.stitch_window, self.early_window = int(stitch_window), int(early_window)
        self.fallback = fallback
        self.detection = detection
        self.chunk_rows = max(1, int(chunk_rows))
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = float(adam_eps)
        self.info = dict(info or {})
        self.last_stats: dict[str, torch.Tensor] = {}

    def params(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "lr": self.lr, "check_every": self.check_every,
                "warmup": self.warmup, "code_channels": self.code_channels,
                "code_scale": self.code_scale, "reg_noise_std": self.reg_noise_std,
                **{k: v for k, v in self.net_kwargs.items()}, "bisect_steps": self.bisect_steps,
                "push": self.push, "stitch_window": self.stitch_window,
                "early_window": self.early_window, "fallback": self.fallback,
                "detection": self.detection, "chunk_rows": self.chunk_rows,
                "betas": list(self.betas), "adam_eps": self.adam_eps, **self.info}

    def _classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z.detach())

    def network(self, channels: int) -> StackedSkipNet:
        return StackedSkipNet(self.code_channels, channels, **self.net_kwargs)

    def fit(self, x: torch.Tensor, noise: Noise) -> DIPTrace:
        """Run the N DIP optimisations together; record reconstructions and their logits."""
        x = x.detach()
        n, c, h, w = x.shape
        net = self.network(c)
        params = net.init_params(noise, x.dtype)
        code_shape = (self.code_channels, h, w)
        z = noise.uniform(code_shape, "dip/code", dtype=x.dtype) * self.code_scale
        names = list(params)
        m = {k: torch.zeros_like(p) for k, p in params.items()}
        v = {k: torch.zeros_like(p) for k, p in params.items()}
        iterates, steps, logits = [], [], []
        with torch.enable_grad():
            for t in range(self.iterations):
                zin = z
                if self.reg_noise_std > 0:
                    zin = z + self.reg_noise_std * noise.normal(code_shape, "dip/reg", step=t, dtype=x.dtype)
                leaves = {k: params[k].detach().requires_grad_(True) for k in names}
                out = net(leaves, zin)
                loss = (out - x).pow(2).flatten(1).mean(1).sum()
                grads = torch.autograd.grad(loss, [leaves[k] for k in names])
                for k, g in zip(names, grads):
                    params[k], m[k], v[k] = adam_update(leaves[k].detach(), g, m[k], v[k], t + 1,
                                                        self.lr, self.betas, self.adam_eps)
                if (t + 1) % self.check_every == 0 or t + 1 == self.iterations:
                    rec = out.detach()
                    iterates.append(rec)
                    steps.append(t + 1)
                    logits.append(self._classify(rec).detach())
        # per row: one network evaluation per iteration, one classifier call per record
        return DIPTrace(torch.stack(iterates), torch.tensor(steps), torch.stack(logits),
                        nfe=self.iterations + len(steps))

    def purify_trace(self, x: torch.Tensor, trace: DIPTrace) -> torch.Tensor:
        """Steps 3–6 on a recorded trajectory: x [N, ...] → purified [N, ...] in [0, 1]."""
        return self._resolve(x, trace).images

    def _resolve(self, x: torch.Tensor, trace: DIPTrace) -> Purified:
        """Steps 3–6 → Purified(x̂, classifier calls per row); sets last_stats."""
        x = x.detach()
        n = x.shape[0]
        rows = torch.arange(n, device=x.device)
        y_adv = self._classify(x).argmax(1)
        preds = trace.logits.argmax(-1)                                  # [K, N]
        first = int((trace.steps < self.warmup).sum())                   # first record ≥ warmup
        early_end = int((trace.steps < self.warmup + self.early_window).sum())
        if self.detection == "early":
            j, y_early = find_crossing(preds, y_adv, first, early_end, trace.logits.shape[-1])
        else:
            j = find_last_switch(preds, y_adv, first)
            y_early = preds[j.clamp(min=0), rows]
        crossed = j >= 0
        if self.fallback == "last":
            out = trace.iterates[-1].clone()
        else:
            out = x.clone()
        alpha = torch.full((n,), float("nan"), dtype=x.dtype, device=x.device)
        if crossed.any():
            r = rows[crossed]
            jr = j[crossed]
            before, after = trace.iterates[jr, r], trace.iterates[jr + 1, r]
            a_r, x_on = localize_boundary(self._classify, before, after, y_early[r], self.bisect_steps)
            pieces = [push_away(x_on, x[r], self.push)]
            for s in range(self.stitch_window):
                pieces.append(trace.iterates[(jr - s).clamp(min=0), r])
            out[r] = torch.stack(pieces).mean(0)
            alpha[r] = a_r
        self.last_stats = {"crossed": crossed, "crossing_step": torch.where(
            crossed, trace.steps.to(j.device)[j.clamp(min=0)], torch.full_like(j, -1)),
            "alpha": alpha, "y_input": y_adv, "y_early": y_early}
        calls = 1 + (self.bisect_steps if bool(crossed.any()) else 0)  # y_adv, then the bisection
        return Purified(out.clamp(0.0, 1.0), calls)

    def _purify_rows(self, x: torch.Tensor, noise: Noise) -> Purified:
        trace = self.fit(x, noise)
        out = self._resolve(x, trace)
        return Purified(out.images, trace.nfe + out.nfe)

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        keyed = self._noise(noise, x)
        x0 = x.detach()
        if x0.shape[0] == 0:
            return Purified(x, 0)
        stats: list[dict[str, torch.Tensor]] = []

        def chunk(xc: torch.Tensor, nc: Noise) -> Purified:
            out = self._purify_rows(xc, nc)
            stats.append(self.last_stats)
            return out

        # rows are independent and batch-free, so chunks (which bound the memory of the
        # recorded trajectory: records × rows × pixels) do not change the result
        out = purify_in_chunks(chunk, x0, keyed, self.chunk_rows)
        self.last_stats = {k: torch.cat([st[k] for st in stats]) for k in stats[0]}
        return Purified(straight_through(x, out.images), out.nfe)  # identity backward (BPDA)


@PURIFIERS.register("dip")
def build(classifier_checkpoint: str, classifier: str = "small_cnn",
          classifier_params: dict | None = None, iterations: int = 300, lr: float = 0.01,
          check_every: int = 2, warmup: int = 30, code_channels: int = 16,
          code_scale: float = 0.1, reg_noise_std: float = 1.0 / 30,
          down: Sequence[int] = (16, 16, 16), up: Sequence[int] | None = None,
          skip: Sequence[int] | int = 4, kernel: int = 3, upsample: str = "bilinear",
          pad_mode: str = "reflect", bisect_steps: int = 8, push: float = 0.5,
          stitch_window: int = 2, early_window: int = 50, fallback: str = "last",
          detection: str = "early", chunk_rows: int = 64,
          betas: Sequence[float] = (0.9, 0.999), adam_eps: float = 1e-8) -> DIPPurifier:
    """Deep Image Prior defense with boundary analysis (Ding et al. 2021); needs the classifier.

    Arguments:
        classifier_checkpoint (str): checkpoint of the classifier under attack.
        classifier (str): its registered classifier name. (Default: "small_cnn")
        classifier_params (dict | None): extra classifier builder params. (Default: None)
        The other arguments are DIPPurifier's, with its defaults.
    """
    clf = freeze(CLASSIFIERS.build(classifier, checkpoint=classifier_checkpoint, **(classifier_params or {})))
    info = {"classifier": classifier, "classifier_checkpoint": classifier_checkpoint}
    return DIPPurifier(clf, iterations=iterations, lr=lr, check_every=check_every, warmup=warmup,
                       code_channels=code_channels, code_scale=code_scale, reg_noise_std=reg_noise_std,
                       down=down, up=up, skip=skip, kernel=kernel, upsample=upsample, pad_mode=pad_mode,
                       bisect_steps=bisect_steps, push=push, stitch_window=stitch_window,
                       early_window=early_window, fallback=fallback, detection=detection,
                       chunk_rows=chunk_rows, betas=betas, adam_eps=adam_eps, info=info)
