"""Attack losses over EOT draws and the three ways of turning R draws into one gradient.

A target returns logits [B, R, K]: R purification draws per sample (R = 1 for a
deterministic model). Every attack maximises a per-sample objective built from them:

* ``mean_loss``   — the mean of the R per-draw losses. Its gradient is the mean of the
  per-draw gradients: the usual EOT estimate (Athalye et al. 2018; Lee & Kim 2023).
* ``mean_logits`` — the loss of the mean logits (Hill et al. 2021, "eot_attack_ave: logits").
* ``sign_sum``    — the step direction is Σ_r sign(∇ₓ loss_r): every draw votes per pixel
  (ADP, Yoon et al. 2021, which sums one signed-gradient step per draw). The reported loss is
  the mean per-draw loss.

Per-draw gradients need one backward pass per draw. The target hides how the R draws were
made (x is repeated inside it and autograd sums the copies' gradients back onto x), so the
attack cannot ask for ∂loss_r/∂x in one pass; it calls ``torch.autograd.grad`` once per draw
on the same graph (``retain_graph``): one forward, R backwards, exactly the draws of the
forward pass. Calling the target R times with one draw each would need a target built with
eot=1 and different step keys per call — a different set of draws than the forward that
decides ``broken_step`` — so it is not used.

Losses (all maximised by the attack):
* ``ce``  untargeted: CE(z, y); targeted: −CE(z, t).
* ``dlr`` untargeted (Croce & Hein 2020): −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12),
  π the logits sorted in decreasing order (K ≥ 3). Targeted (their "DLR-targeted"):
  −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12), which needs the true label y and K ≥ 4.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

EOT_REDUCTIONS = ("mean_loss", "mean_logits", "sign_sum")
LOSSES = ("ce", "dlr")
_TINY = 1e-12


def ce_loss(z: torch.Tensor, y_true: torch.Tensor | None, y_target: torch.Tensor | None,
            targeted: bool) -> torch.Tensor:
    """z [N, K] → [N]: CE to y_true (untargeted) or −CE to y_target (targeted)."""
    if targeted:
        return -F.cross_entropy(z, y_target, reduction="none")
    return F.cross_entropy(z, y_true, reduction="none")


def dlr_loss(z: torch.Tensor, y_true: torch.Tensor, y_target: torch.Tensor | None,
             targeted: bool) -> torch.Tensor:
    """Difference-of-logits ratio, z [N, K] → [N]; shift- and scale-invariant in z."""
    K = z.shape[1]
    if K < (4 if targeted else 3):
        raise ValueError(f"{'targeted ' if targeted else ''}DLR needs ≥ {4 if targeted else 3} classes, got {K}")
    z_sorted = z.sort(dim=1, descending=True).values
    z_y = z.gather(1, y_true.view(-1, 1)).squeeze(1)
    if targeted:
        z_t = z.gather(1, y_target.view(-1, 1)).squeeze(1)
        denom = z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3]) + _TINY
        return -(z_y - z_t) / denom
    others = z.scatter(1, y_true.view(-1, 1), float("-inf"))
    denom = z_sorted[:, 0] - z_sorted[:, 2] + _TINY
    return -(z_y - others.max(1).values) / denom


def per_sample_loss(loss: str) -> Callable[..., torch.Tensor]:
    if loss == "ce":
        return ce_loss
    if loss == "dlr":
        return dlr_loss
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


def per_draw_loss(logits: torch.Tensor, y_true: torch.Tensor | None, y_target: torch.Tensor | None = None,
                  loss: str = "ce", targeted: bool = False) -> torch.Tensor:
    """logits [B, R, K] → per-draw loss [B, R]."""
    B, R, K = logits.shape
    rep = (lambda t: None if t is None else t.repeat_interleave(R))
    out = per_sample_loss(loss)(logits.reshape(B * R, K), rep(y_true), rep(y_target), targeted)
    return out.view(B, R)


def eot_objective(logits: torch.Tensor, y_true: torch.Tensor | None, y_target: torch.Tensor | None = None,
                  loss: str = "ce", reduction: str = "mean_loss", targeted: bool = False) -> torch.Tensor:
    """The per-sample objective [B] an attack maximises (differentiable in the logits).

    For ``sign_sum`` this is the mean per-draw loss (the value; its gradient is not the
    direction the attack uses — see `eot_gradient`).
    """
    if reduction in ("mean_loss", "sign_sum"):
        return per_draw_loss(logits, y_true, y_target, loss, targeted).mean(1)
    if reduction == "mean_logits":
        return per_sample_loss(loss)(logits.mean(1), y_true, y_target, targeted)
    raise ValueError(f"unknown EOT reduction {reduction!r}; expected one of {EOT_REDUCTIONS}")


def eot_gradient(logits: torch.Tensor, x: torch.Tensor, y_true: torch.Tensor | None,
                 y_target: torch.Tensor | None = None, loss: str = "ce", reduction: str = "mean_loss",
                 targeted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective [B], ascent direction [B, ...]) from logits [B, R, K] computed from x.

    mean_loss / mean_logits: ∇ₓ of the objective (one backward). sign_sum: Σ_r sign(∇ₓ loss_r)
    (R backwards on the retained graph). Samples are independent, so ∇ₓ Σ_b loss_b gives every
    sample's own gradient.
    """
    if reduction == "sign_sum":
        draws = per_draw_loss(logits, y_true, y_target, loss, targeted)  # [B, R]
        R = draws.shape[1]
        direction = torch.zeros_like(x)
        for r in range(R):
            (g,) = torch.autograd.grad(draws[:, r].sum(), x, retain_graph=r < R - 1)
            direction += g.sign()
        return draws.mean(1).detach(), direction
    obj = eot_objective(logits, y_true, y_target, loss, reduction, targeted)
    (g,) = torch.autograd.grad(obj.sum(), x)
    return obj.detach(), g

