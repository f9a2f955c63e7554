"""Update rules of the iterative purifiers, as pure tensor math (no loops over data, no I/O).

References
- [ADP] Yoon, Hwang, Lee, "Adversarial Purification with Score-based Generative Models",
  ICML 2021 (arXiv:2106.06041), Sec. 3.2 (purification by deterministic score ascent with
  an adaptive step size).
- [EBM] Hill, Mitchell, Zhu, "Stochastic Security: Adversarial Defense Using Long-Run
  Dynamics of Energy-Based Models", ICLR 2021 (arXiv:2005.13525), Eq. (2) (Langevin
  update) and Sec. 3.2 (ε²/2 absorbed into the energy).
- [Adam] Kingma, Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015
  (arXiv:1412.6980), Algorithm 1 (the inner optimiser of APuDAE and DIP).
- [BPDA] Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of Security",
  ICML 2018 (arXiv:1802.00420), Sec. 4.1 (straight-through: forward f(x), backward identity).

Every function here keeps autograd intact unless its name says otherwise (straight_through
detaches on purpose); none uses no_grad. The loop helpers decide from the grad mode and
`requires_grad` whether a graph is needed at all.
"""
from __future__ import annotations

import contextvars
import functools
import math
from typing import Any, Callable, Sequence

import torch

from pipeline.purifiers.base import Purified
from pipeline.seeding import Noise

_SQRT_FLOOR = 1e-30  # keeps d√v/dv finite at v = 0 for unrolled graphs; √1e-30 ≪ any Adam eps

# ---------------------------------------------------------------------------------------
# Shared by every purifier: straight-through, Adam, chunking
# ---------------------------------------------------------------------------------------


def straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward y, backward identity to x ([BPDA] Sec. 4.1): x + (y − x).detach()."""
    return x + (y - x).detach()


def adam_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int,
                lr: float, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam step ([Adam] Algorithm 1), element-wise and out of place so it can be unrolled.

    t counts from 1. Returns (p, m, v) after the step. Every operation is per element, so
    stacked independent problems (rows, per-row networks) stay independent.
    """
    b1, b2 = betas
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    m_hat = m / (1.0 - b1 ** t)
    v_hat = v / (1.0 - b2 ** t)
    p = p - lr * m_hat / (torch.sqrt(v_hat + _SQRT_FLOOR) + eps)
    return p, m, v


def purify_in_chunks(purify: Callable[[torch.Tensor, Noise], Purified], x: torch.Tensor,
                     noise: Noise, rows: int) -> Purified:
    """purify(x, noise) over chunks of at most `rows` rows (bounds memory, not the result:
    rows are independent). nfe counts evaluations per row, so it is the max over chunks,
    not their sum; the per-row stats are concatenated like the images."""
    if x.shape[0] <= rows:
        return purify(x, noise)
    outs = [purify(x[i:i + rows], noise.select(slice(i, i + rows))) for i in range(0, x.shape[0], rows)]
    stats = {k: torch.cat([o.stats[k] for o in outs]) for k in outs[0].stats}
    return Purified(torch.cat([o.images for o in outs]), max(o.nfe for o in outs), stats)


def batch_free_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """1 / (1 + exp(−h)). torch.sigmoid's CPU kernel rounds the tail of a tensor differently
    from its vectorised body (1 ulp), so a row's value would depend on where it sits in the
    batch; exp and division do not. Clamped so exp cannot overflow (σ(±60) is 0/1 in float32)."""
    return torch.reciprocal(torch.exp(-h.clamp(-60.0, 60.0)) + 1.0)

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


_SECOND_ORDER = contextvars.ContextVar("advpure_second_order", default=False)


def in_second_order() -> bool:
    """True while a network is evaluated for a graph that will be differentiated twice
    (energy_grad with create_graph): compiled networks fall back to eager there, as
    torch.compile'd graphs cannot be double-differentiated."""
    return _SECOND_ORDER.get()


def energy_grad(energy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """∇_x Σ_i U(x_i) for energies U: [N, ...] → [N].

    When the caller needs gradients through the result (grad mode on and x requires grad)
    the graph of the gradient itself is built (create_graph) so that d(output)/d(input)
    is exact (a full-gradient attack differentiates through ∇U). Otherwise the gradient is
    taken on a detached copy and returned without a graph: no memory held across steps.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        token = _SECOND_ORDER.set(True)
        try:
            return torch.autograd.grad(energy(x).sum(), x, create_graph=True)[0]
        finally:
            _SECOND_ORDER.reset(token)
    with torch.enable_grad():  # ∇U is needed even when the caller evaluates under no_grad
        xd = x.detach().requires_grad_(True)
        return torch.autograd.grad(energy(xd).sum(), xd)[0]


# ---------------------------------------------------------------------------------------
# Step loops with gradient checkpointing
# ---------------------------------------------------------------------------------------
#
# Why not torch.utils.checkpoint: every step of a Langevin chain calls autograd.grad (for
# ∇U) inside the checkpointed region. The non-reentrant checkpoint takes each of those
# calls for a backward pass that needs the region's saved activations, so each one re-runs
# the region's forward from the segment start (s(s+1)/2 step evaluations per segment of s
# steps instead of s) and keeps that recomputation's tensors alive, under its own graph-task
# id, until the real backward: time ×s and memory ∝ s² per segment. `checkpoint_segment`
# below is the reentrant scheme instead: the forward runs under no_grad (∇U then costs one
# plain first-order gradient and keeps nothing), the backward recomputes one segment with
# its full (second-order) graph and differentiates it right away.


# The one meaning of every purifier's `checkpoint_segment` setting (ADP, Langevin EBM, …):
# steps per checkpointed segment when a graph is needed; AUTO_SEGMENT (−1, the default)
# picks the memory-optimal length (auto_segment), 0 turns checkpointing off (fastest when
# the whole graph fits: `advpure plan` says when), k > 0 fixes it. Memory only: values
# and gradients are the same for every choice.
AUTO_SEGMENT = -1


def needs_graph(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _Segment(torch.autograd.Function):
    """fn(*tensors) → tensor or tuple, forward under no_grad, recomputed in backward."""

    @staticmethod
    def forward(ctx, fn, *inputs):  # type: ignore[override]
        ctx.fn = fn
        ctx.device_type = next((t.device.type for t in inputs), "cpu")
        ctx.autocast = _autocast_state(ctx.device_type)
        ctx.save_for_backward(*inputs)
        out = fn(*inputs)  # grad mode is off inside Function.forward: no graph is built
        ctx.single = not isinstance(out, tuple)
        outs = (out,) if ctx.single else out
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        want = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(w) for t, w in zip(ctx.saved_tensors, want)]
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            out = ctx.fn(*inputs)
        outs = (out,) if ctx.single else out
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt = [t for t in inputs if t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                   if pairs and wrt else [None] * len(wrt))
        return (None, *[next(got) if w else None for w in want])


def checkpoint_segment(fn: Callable[..., Any], *inputs: torch.Tensor) -> Any:
    """fn(*inputs) with only `inputs` kept for backward: the forward runs without a graph
    and backward recomputes fn with one (second-order where fn differentiates inside, as
    Langevin's ∇U). Gradients flow to the floating inputs only — the networks must be
    frozen (every purifier's are). fn must be deterministic given its inputs (keyed
    noise is); non-floating outputs are not differentiable."""
    return _Segment.apply(fn, *inputs)


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of per-row tensors (first dim = rows) an autograd graph saves."""

    def __init__(self, rows: int):
        self.total, seen = 0, set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if t.dim() and t.shape[0] == rows and key not in seen:
                seen.add(key)
                self.total += t.numel() * t.element_size()
            # not t itself: a saved output packed as-is refers back to its own grad_fn, a
            # cycle the garbage collector cannot see, so every measured graph would leak
            return t.detach()

        super().__init__(pack, lambda t: t)


def step_graph_bytes(step: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, t: int) -> int:
    """Bytes the graph of one step holds for backward (per-row tensors), measured by
    running that step once with a graph on a detached copy of x."""
    counter = SavedBytes(x.shape[0])
    with torch.enable_grad(), counter:
        step(x.detach().requires_grad_(True), t)
    return counter.total


def auto_segment(n_steps: int, state_bytes: int = 1, step_bytes: int = 1) -> int:
    """Steps per segment that minimise peak memory: (K/s)·state + s·step is smallest at
    s = √(K·state/step). With the defaults (sizes unknown) this is √K."""
    s = math.sqrt(max(1, n_steps) * max(1, state_bytes) / max(1, step_bytes))
    return int(min(max(1, n_steps), max(1, round(s))))


def run_steps(step: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, n_steps: int,
              segment: int = 0, start: int = 0) -> torch.Tensor:
    """x ← step(x, t) for t = start … start+n_steps−1.

    With a graph needed and segment > 0, steps run in checkpointed segments of `segment`
    steps (`checkpoint_segment`): only each segment's input is kept, and one segment's graph
    is rebuilt at a time during backward; the last segment keeps its graph from the start.
    segment < 0 picks the memory-optimal length from the bytes one step's graph holds
    (measured on the first step) against one state's. Values are the same either way;
    `step` must be deterministic given (x, t).
    """
    if segment == 0 or n_steps <= 0 or not needs_graph(x):
        for t in range(start, start + n_steps):
            x = step(x, t)
        return x
    if segment < 0:
        state = x.numel() * x.element_size()
        segment = auto_segment(n_steps, state, step_graph_bytes(step, x, start))

    def run_segment(t0: int, t1: int, x_in: torch.Tensor) -> torch.Tensor:
        for t in range(t0, t1):
            x_in = step(x_in, t)
        return x_in

    # the last segment keeps its graph: backward needs it first, so recomputing it would add
    # compute without lowering the peak (one segment's graph plus the saved states)
    last = start + (n_steps - 1) // segment * segment
    for t in range(start, last, segment):
        x = checkpoint_segment(functools.partial(run_segment, t, t + segment), x)
    return run_segment(last, start + n_steps, x)
