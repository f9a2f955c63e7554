"""The attack interface, threat-model projection and the EOT loss.

An attack never sees the defense's internals. It gets an `AttackTarget`: a callable
`target(x, step) -> logits [B, R, K]` that is differentiable in x. R is the number of
EOT draws (1 for a deterministic model); the target decides how gradients pass the
purifier (full gradient or BPDA) and keys fresh randomness to every step.

Template for an attack's docstring (after torchattacks):
    Paper. Threat model. Arguments with defaults and ranges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from pipeline.seeding import Noise

NORMS = ("linf", "l2")


class AttackTarget(Protocol):
    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """logits [B, R, K] for inputs x [B, C, H, W]; `step` keys the draws."""


@dataclass
class AttackResult:
    x_adv: torch.Tensor          # [B, C, H, W], within the ε-ball and [0, 1]
    broken_step: torch.Tensor    # [B] int64: first step whose forward pass misclassified, -1 never
    nfe: int                     # target evaluations (forward + backward) per sample


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project x_adv onto {‖x_adv − x‖ ≤ ε} ∩ [0, 1]^d."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (eps / n).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
    else:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    return (x + delta).clamp(0.0, 1.0)


def normalized_step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign(g) for ℓ∞, g/‖g‖₂ for ℓ2."""
    if norm == "linf":
        return grad.sign()
    n = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / n.view(-1, *[1] * (grad.dim() - 1))


def random_start(x: torch.Tensor, eps: float, norm: str, noise: Noise) -> torch.Tensor:
    """A uniform point of the ε-ball (ℓ∞) or a point on a uniformly random direction (ℓ2)."""
    shape = tuple(x.shape[1:])
    if norm == "linf":
        delta = noise.uniform(shape, "random_start", low=-eps, high=eps).to(x)
    else:
        d = noise.normal(shape, "random_start").to(x)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * len(shape))
        r = noise.uniform((1,), "random_start_radius").to(x).view(-1, *[1] * len(shape))
        delta = d * r * eps
    return project(x + delta, x, eps, norm)


EOT_REDUCTIONS = ("mean_loss", "mean_logits")


def eot_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean_loss",
             targeted: bool = False) -> torch.Tensor:
    """Per-sample cross-entropy over R draws; logits [B, R, K] → loss [B].

    mean_loss: mean of per-draw CE (its gradient is the EOT gradient estimate);
    mean_logits: CE of the mean logits (Hill et al. 2021).
    For targeted attacks y is the target class and the loss is negated (descent on CE).
    """
    B, R, K = logits.shape
    if reduction == "mean_loss":
        loss = F.cross_entropy(logits.reshape(B * R, K), y.repeat_interleave(R), reduction="none")
        loss = loss.view(B, R).mean(1)
    elif reduction == "mean_logits":
        loss = F.cross_entropy(logits.mean(1), y, reduction="none")
    else:
        raise ValueError(f"unknown EOT reduction {reduction!r}; expected one of {EOT_REDUCTIONS}")
    return -loss if targeted else loss


def misclassified(logits: torch.Tensor, y: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    """[B] bool from logits [B, R, K], by mean logits: wrong (untargeted) or hit (targeted)."""
    pred = logits.mean(1).argmax(1)
    return pred == y if targeted else pred != y


class Attack:
    """Base class. Subclasses implement `perturb`; constructor arguments are the whole config."""

    name: str = "attack"

    def __init__(self, eps: float, norm: str = "linf", targeted: bool = False,
                 eot_reduction: str = "mean_loss"):
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        if not eps >= 0:
            raise ValueError(f"eps must be ≥ 0 (images are in [0, 1]), got {eps}")
        if norm == "linf" and eps > 1:
            raise ValueError(f"ℓ∞ eps is in [0, 1] image units; got {eps} (did you mean {eps}/255?)")
        if eot_reduction not in EOT_REDUCTIONS:
            raise ValueError(f"unknown eot_reduction {eot_reduction!r}; expected one of {EOT_REDUCTIONS}")
        self.eps = float(eps)
        self.norm = norm
        self.targeted = targeted
        self.eot_reduction = eot_reduction

    def params(self) -> dict[str, Any]:
        return {"eps": self.eps, "norm": self.norm, "targeted": self.targeted,
                "eot_reduction": self.eot_reduction}

    def __call__(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor,
                 noise: Noise) -> AttackResult:
        if self.eps == 0:
            return AttackResult(x.detach().clone(), torch.full((x.shape[0],), -1, dtype=torch.int64), 0)
        return self.perturb(target, x, y, noise)

    def perturb(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor,
                noise: Noise) -> AttackResult:
        raise NotImplementedError

    def loss_and_grad(self, target: AttackTarget, x_adv: torch.Tensor, y: torch.Tensor,
                      step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss [B], ∇ₓ loss, logits [B, R, K]) at x_adv; gradient ascent increases the loss."""
        x_adv = x_adv.detach().requires_grad_(True)
        logits = target(x_adv, step)
        loss = eot_loss(logits, y, self.eot_reduction, self.targeted)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        return loss.detach(), grad.detach(), logits.detach()


def track_broken(broken_step: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                 step: int, targeted: bool) -> torch.Tensor:
    """Record the first step at which the model's forward pass was fooled."""
    fooled = misclassified(logits, y, targeted).to(broken_step.device)
    return torch.where((broken_step < 0) & fooled, torch.full_like(broken_step, step), broken_step)


AttackFactory = Callable[..., Attack]
