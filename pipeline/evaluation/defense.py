"""classifier ∘ purifier: the R-run evaluation view and the attack views (full gradient, BPDA).

Replicas are batched: a batch [B, ...] becomes [B·R, ...] (sample-major) and is pushed
through purifier and classifier in chunks of at most `max_rows` rows.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.attacks.base import AttackTarget
from pipeline.purifiers import steps
from pipeline.purifiers.base import Purified, Purifier
from pipeline.seeding import Noise
from pipeline.vocabulary import GRADIENT_MODES


def honest_gradient_mode(purifier: Purifier) -> str:
    """The attack the purifier's flags call for: full gradient where autograd is the true
    gradient, BPDA (with EOT if stochastic) where it is not or where the purifier optimises."""
    if purifier.differentiable and not purifier.test_time_optimization:
        return "full"
    return "bpda"


PRECISIONS = ("fp32", "bf16")


def autocast_safe(purifier: Purifier) -> bool:
    """Whether the purifier's networks may run in bf16. Not ADP (its step size is a secant
    1 − ⟨g, s(x+δg)⟩/⟨g, g⟩ at δ = 1e-3, below bf16's ~3 significant digits) nor test-time
    optimisation (inner Adam on small updates); one-pass and sampling purifiers may."""
    return bool(getattr(purifier, "autocast_safe", True)) and not purifier.test_time_optimization


class FastNet(nn.Module):
    """A network in the job's precision and memory format, fp32 out (losses, attack steps,
    projections and chain states stay fp32: autocast touches matmul/conv-like ops only).
    With compile, a torch.compile'd copy serves every call except second-order ones
    (steps.in_second_order: Langevin ∇U under a full-gradient attack), which compiled
    graphs cannot differentiate twice."""

    def __init__(self, net: nn.Module, bf16: bool = False, channels_last: bool = False, compile: bool = False):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.bf16, self.channels_last = bool(bf16), bool(channels_last)
        self.compiled = None
        if compile:
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False  # EOT sign_sum backpropagates one graph R times
            self.compiled = torch.compile(self.net, backend=COMPILE_BACKEND)
        self.num_classes = getattr(net, "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        fn = self.net if self.compiled is None or steps.in_second_order() else self.compiled
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = fn(x)
        return out.float() if self.bf16 and out.is_floating_point() else out


COMPILE_BACKEND = "inductor"  # tests use "aot_eager": same autograd path, no C++ build


def speed_up(classifier: nn.Module, purifier: Purifier, precision: str = "fp32", channels_last: bool = False,
             compile: bool = False) -> nn.Module:
    """Apply evaluation.precision / channels_last / compile: the purifier's networks are
    wrapped in place (compile and bf16 only where safe), the classifier is returned wrapped."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    bf16 = precision == "bf16"
    if not purifier.test_time_optimization and (bf16 or channels_last or compile):
        for name, child in list(purifier.named_children()):
            setattr(purifier, name, FastNet(child, bf16 and autocast_safe(purifier), channels_last, compile))
    return FastNet(classifier, bf16, channels_last) if bf16 or channels_last else classifier


class Defense(nn.Module):
    def __init__(self, classifier: nn.Module, purifier: Purifier, max_rows: int = 4096):
        super().__init__()
        self.classifier = classifier
        self.purifier = purifier
        self.max_rows = max(1, int(max_rows))

    def purify(self, x: torch.Tensor, noise: Noise) -> Purified:
        """x [N, ...] with noise rows N → Purified(x̂ [N, ...], nfe per row), chunked
        (nfe is the max over chunks: it counts evaluations per row, not per chunk)."""
        return steps.purify_in_chunks(self.purifier.purify, x, noise, self.max_rows)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier(x[i:i + self.max_rows]) for i in range(0, x.shape[0], self.max_rows)])

    def logits(self, x: torch.Tensor, noise: Noise, mode: str = "full") -> torch.Tensor:
        """Logits [B, R, K] of the defended model over R = noise.rows // B purification runs.

        mode "full": autograd through the purifier; "bpda": identity backward through the
        purifier (straight-through); "classifier": no purifier at all.
        """
        B = x.shape[0]
        if mode == "classifier":
            return self.classify(x).unsqueeze(1)
        if noise.rows % B:
            raise ValueError(f"noise rows {noise.rows} not a multiple of batch {B}")
        R = noise.rows // B
        xr = x.repeat_interleave(R, 0)  # [B·R, C, H, W], sample-major
        if mode == "full":
            purified = self.purify(xr, noise).images
        elif mode == "bpda":
            with torch.no_grad():
                p = self.purify(xr.detach(), noise).images
            purified = steps.straight_through(xr, p)  # forward: p; backward: identity (Athalye et al. 2018)
        else:
            raise ValueError(f"unknown gradient mode {mode!r}; expected one of {GRADIENT_MODES}")
        out = self.classify(purified)
        return out.view(B, R, -1)

    def attack_target(self, mode: str, seed: int, keys: Sequence[str], context: str,
                      eot: int = 1) -> AttackTarget:
        """The differentiable view an attack sees: every step gets fresh keyed draws."""
        if mode not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode {mode!r}; expected one of {GRADIENT_MODES}")
        keys = list(keys)

        def target(x: torch.Tensor, step: int) -> torch.Tensor:
            if mode == "classifier":  # no draws: building keyed noise would only cost hashes and a copy
                return self.classify(x).unsqueeze(1)
            noise = Noise.for_batch(seed, keys, f"{context}/step{step}", eot, x.device)
            return self.logits(x, noise, mode)

        # the same view for some rows only (attacks skip broken samples); draws stay per sample
        target.select_rows = lambda rows: self.attack_target(mode, seed, [keys[i] for i in rows.tolist()],
                                                             context, eot)
        # an EOT gradient step runs forward and backward per chunk of samples whose rows fit one
        # call (read at call time: `max_rows: auto` settles max_rows on the first batch)
        target.sample_chunk = lambda: max(1, self.max_rows // (1 if mode == "classifier" else eot))
        return target
