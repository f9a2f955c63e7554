"""Update rules of the iterative purifiers, as pure tensor math (no loops over data, no I/O).

References
- [ADP] Yoon, Hwang, Lee, "Adversarial Purification with Score-based Generative Models",
  ICML 2021 (arXiv:2106.06041), Sec. 3.2 (purification by deterministic score ascent with
  an adaptive step size) and Sec. 3.3 (randomised purification / ensembles).
- [EBM] Hill, Mitchell, Zhu, "Stochastic Security: Adversarial Defense Using Long-Run
  Dynamics of Energy-Based Models", ICLR 2021 (arXiv:2005.13525), Eq. (2) (Langevin
  update) and Sec. 3.2 (ε²/2 absorbed into the energy), Sec. 4 (EOT defense prediction).

Every function here keeps autograd intact: none detaches, none uses no_grad. The loop
helpers decide from the grad mode and `requires_grad` whether a graph is needed at all.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------
# ADP: score grid and adaptive step size
# ---------------------------------------------------------------------------------------


def to_score_grid(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels → centres of the 256 quantisation bins (x·255/256 + 1/512), the input
    scale of the ADP score network (ADP code, utils/transforms.py)."""
    return x * (255.0 / 256.0) + (1.0 / 512.0)


def from_score_grid(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_score_grid` (x·256/255 − 1/510)."""
    return x * (256.0 / 255.0) - (1.0 / 510.0)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row inner product ⟨a_i, b_i⟩ of [N, ...] tensors → [N]."""
    return (a.flatten(1) * b.flatten(1)).sum(1)


def adp_step_size(g: torch.Tensor, g_probe: torch.Tensor, delta: float, lam: float,
                  lo: float, hi: float) -> torch.Tensor:
    """ADP adaptive step size α per row (ADP Sec. 3.2, Eq. 6–7).

    g = s_θ(x) and g_probe = s_θ(x + δ·g). A one-dimensional secant model of the score
    along g gives z = ⟨g, s_θ(x+δg)⟩ / ⟨g, g⟩ ≈ 1 − δ·(curvature along g), and the step
    α = clip(λ·δ / (1 − z), lo, hi). For a Gaussian score s(x) = −(x − m)/v this is
    exactly α = λ·v, i.e. each step removes the fraction λ of the distance to m.
    z > 1 (negative curvature) makes λδ/(1 − z) negative, which the clip sends to `lo`,
    as in the reference code.
    """
    gg = row_dot(g, g).clamp_min(torch.finfo(g.dtype).tiny)  # g ≡ 0 only for a dead network
    z = row_dot(g, g_probe) / gg
    return torch.clamp(lam * delta / (1.0 - z), min=lo, max=hi)


def adp_update(x: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor, active: torch.Tensor,
               lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """x ← clip(x + α·g, lo, hi) for active rows; stopped rows stay where they are."""
    step = (alpha * active.to(alpha.dtype)).view(-1, *([1] * (x.dim() - 1)))
    moved = torch.clamp(x + step * g, lo, hi)
    keep = active.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep, moved, x)


# ---------------------------------------------------------------------------------------
# Langevin dynamics on an energy
# ---------------------------------------------------------------------------------------


def langevin_step(x: torch.Tensor, grad_energy: torch.Tensor, eps: float, z: torch.Tensor) -> torch.Tensor:
    """One Langevin update with ε²/2 absorbed into the energy ([EBM] Eq. 2, Sec. 3.2).

    The sampler X ← X − (ε²/2)·∇E(X) + ε·Z with the network trained so that its output
    U = (ε²/2)·E becomes X ← X − ∇U(X) + ε·Z: `grad_energy` is ∇U of the network as is.
    No clipping: the reference lets chains leave [−1, 1].
    """
    return x - grad_energy + eps * z


def energy_grad(energy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """∇_x Σ_i U(x_i) for energies U: [N, ...] → [N].

    When the caller needs gradients through the result (grad mode on and x requires grad)
    the graph of the gradient itself is built (create_graph) so that d(output)/d(input)
    is exact (a full-gradient attack differentiates through ∇U). Otherwise the gradient is
    taken on a detached copy and returned without a graph: no memory held across steps.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.autograd.grad(energy(x).sum(), x, create_graph=True)[0]
    with torch.enable_grad():  # ∇U is needed even when the caller evaluates under no_grad
        xd = x.detach().requires_grad_(True)
        return torch.autograd.grad(energy(xd).sum(), xd)[0]


# ---------------------------------------------------------------------------------------
# Step loops with gradient checkpointing
# ---------------------------------------------------------------------------------------


def needs_graph(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def auto_segment(n_steps: int) -> int:
    """√K steps per checkpoint segment: memory O(√K) states + one segment's activations."""
    return max(1, int(math.ceil(math.sqrt(max(1, n_steps)))))


def run_steps(step: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, n_steps: int,
              segment: int = 0, start: int = 0) -> torch.Tensor:
    """x ← step(x, t) for t = start … start+n_steps−1.

    With a graph needed and segment > 0 (or segment < 0 for √K), steps run in checkpointed
    segments (torch.utils.checkpoint, non-reentrant): only each segment's input is kept,
    and a segment's activations are rebuilt during backward, so memory no longer grows
    with the step count. `step` must be deterministic given (x, t) — keyed noise is.
    """
    if segment < 0:
        segment = auto_segment(n_steps)
    if segment == 0 or not needs_graph(x):
        for t in range(start, start + n_steps):
            x = step(x, t)
        return x

    def run_segment(x_in: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        for t in range(t0, t1):
            x_in = step(x_in, t)
        return x_in

    t = start
    end = start + n_steps
    while t < end:
        t1 = min(end, t + segment)
        x = checkpoint(run_segment, x, t, t1, use_reentrant=False)
        t = t1
    return x


# ---------------------------------------------------------------------------------------
# Ensemble / EOT-defense predictions over R purification runs
# ---------------------------------------------------------------------------------------

ENSEMBLE_METHODS = ("logits", "softmax", "logsoftmax", "vote")


def ensemble_scores(logits: torch.Tensor, method: str = "logits") -> torch.Tensor:
    """Combine logits [B, R, K] of R stochastic purification runs into scores [B, K].

    - "logits": Σ_r logits (ADP "l"; EBM EOT defense "logits", the mean differs by 1/R only)
    - "softmax": Σ_r softmax (ADP "s"; EBM "softmax")
    - "logsoftmax": mean_r log-softmax (EBM "logsoftmax")
    - "vote": Σ_r one-hot(argmax) (ADP "o", majority vote; ties → lowest class index)
    The prediction is argmax of the scores.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, R, K], got {tuple(logits.shape)}")
    if method == "logits":
        return logits.sum(1)
    if method == "softmax":
        return F.softmax(logits, dim=-1).sum(1)
    if method == "logsoftmax":
        return F.log_softmax(logits, dim=-1).mean(1)
    if method == "vote":
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype).sum(1)
    raise ValueError(f"unknown ensemble method {method!r}; expected one of {ENSEMBLE_METHODS}")


def ensemble_predict(logits: torch.Tensor, method: str = "logits") -> torch.Tensor:
    """Predicted labels [B] from logits [B, R, K] (see `ensemble_scores`)."""
    return ensemble_scores(logits, method).argmax(-1)


def ensemble_predictions(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """All ensemble predictions at once: {"logits", "softmax", "logsoftmax", "vote"} → [B]."""
    return {m: ensemble_predict(logits, m) for m in ENSEMBLE_METHODS}
