"""Gradient-masking and evaluation sanity checks (after AutoAttack's checks.py and the
checklist of Carlini et al. 2019, "On Evaluating Adversarial Robustness").

Pure functions: tensors or plain numbers in, a small JSON-serialisable dict out —
{"name", "passed", "detail", "values"}. `passed: False` is a warning that the robustness
number may be wrong (masked gradients, a too-weak attack, an undeclared stochastic model);
it never stops a run. No I/O, no Ray, no pyarrow.

Checks:
  check_randomness           two forward passes of the same inputs: stochastic? keyed?
  check_gradients            fraction of samples with an all-zero or non-finite input gradient
  check_test_time_optimization  the purifier optimises at test time (full-gradient attacks unreliable)
  check_eot                  stochastic purifier attacked without EOT
  check_output_range         the "logits" look like probabilities
  run_gradient_checks        randomness + gradients from an attack target
  summarize                  all checks → {"passed", "failed"}

The record-level checks (ε monotone, unbounded ε, attack ordering, Square vs gradient,
convergence) need only per-attack figures: they live in pipeline.report.record_checks,
which the torch-free report imports.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F


def _result(name: str, passed: bool, detail: str, values: Any) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail, "values": values}


def _f(v: float) -> float | None:
    """A JSON-safe float (NaN/inf become None)."""
    v = float(v)
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------- (1) randomness

def check_randomness(logits_a: torch.Tensor, logits_b: torch.Tensor, same_keys: bool,
                     declared_stochastic: bool | None = None, atol: float = 1e-5) -> dict[str, Any]:
    """Compare two forward passes of the same inputs (logits [B, K] or [B, R, K]).

    same_keys=True: the passes used the same noise keys, so they must agree; a difference
    means randomness that does not come from the keys (global RNG, dropout left on) and
    breaks reproducibility — always a failure.
    same_keys=False: a difference means the model is stochastic. Passed when that matches
    `declared_stochastic` (the purifier's flag); with no declaration, passed only if
    deterministic (AutoAttack's rule: a stochastic model needs EOT and R-run evaluation).
    Differences are measured on L2-normalised logits (scale-free, as AutoAttack).
    """
    a = logits_a.detach().float().flatten(1)
    b = logits_b.detach().float().flatten(1)
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    na = a / a.norm(dim=1, keepdim=True).clamp_min(1e-10)
    nb = b / b.norm(dim=1, keepdim=True).clamp_min(1e-10)
    diff = (na - nb).norm(dim=1)
    pa = logits_a.detach().reshape(a.shape[0], -1, logits_a.shape[-1]).mean(1).argmax(1)
    pb = logits_b.detach().reshape(b.shape[0], -1, logits_b.shape[-1]).mean(1).argmax(1)
    differs = bool((diff > atol).any()) or bool((pa != pb).any())
    values = {"max_diff": _f(diff.max()) if diff.numel() else 0.0,
              "fraction_differing": float((diff > atol).float().mean()) if diff.numel() else 0.0,
              "fraction_prediction_changed": float((pa != pb).float().mean()) if diff.numel() else 0.0,
              "same_keys": bool(same_keys), "declared_stochastic": declared_stochastic,
              "stochastic": differs}
    if same_keys:
        if differs:
            return _result("randomness", False, "outputs differ under the same noise keys: randomness "
                           "outside the keyed Noise (global RNG, dropout/batch-norm in train mode); "
                           "results are not reproducible", values)
        return _result("randomness", True, "same keys give identical outputs", values)
    if declared_stochastic is None:
        if differs:
            return _result("randomness", False, "the defense is stochastic: evaluate over R runs and "
                           "attack with EOT", values)
        return _result("randomness", True, "the defense is deterministic", values)
    if differs == declared_stochastic:
        return _result("randomness", True, f"{'stochastic' if differs else 'deterministic'} as declared", values)
    if differs:
        return _result("randomness", False, "declared deterministic but outputs change with the keys: "
                       "mark the purifier stochastic (EOT, R runs)", values)
    return _result("randomness", False, "declared stochastic but outputs do not change with the keys: "
                   "the noise is not used (or is negligible)", values)


# ----------------------------------------------------------------------------- (2) gradients

def check_gradients(grad: torch.Tensor, max_fraction: float = 0.0) -> dict[str, Any]:
    """Input gradients [B, ...]: flag when more than `max_fraction` of the samples have an
    all-zero or non-finite gradient (shattered/vanishing gradients, quantisation, NaN)."""
    g = grad.detach().flatten(1)
    B = g.shape[0]
    nonfinite = ~torch.isfinite(g).all(1)
    zero = (g == 0).all(1) & ~nonfinite
    bad = zero | nonfinite
    n_zero, n_nonfinite, n_bad = int(zero.sum()), int(nonfinite.sum()), int(bad.sum())
    frac = n_bad / B if B else 0.0
    values = {"samples": B, "zero": n_zero, "nonfinite": n_nonfinite,
              "zero_fraction": n_zero / B if B else 0.0,
              "nonfinite_fraction": n_nonfinite / B if B else 0.0,
              "bad_fraction": frac, "max_fraction": max_fraction}
    if frac > max_fraction:
        return _result("gradients", False, f"{n_bad} of {B} samples have zero ({n_zero}) "
                       f"or non-finite ({n_nonfinite}) input gradients: gradient-based attacks are "
                       "unreliable here (try BPDA, EOT, or a gradient-free attack)", values)
    return _result("gradients", True, "input gradients are non-zero and finite", values)


# ----------------------------------------------------------------------------- (3) purifier flags

def check_test_time_optimization(flags: Mapping[str, bool], gradient_mode: str | None = None) -> dict[str, Any]:
    """A purifier that optimises at test time: autograd through its inner loop is typically
    masked or unaffordable; an honest attack uses BPDA(+EOT) and adaptive tests
    (Croce et al. 2022). Flags a full-gradient attack on such a purifier, and reports the
    purifier itself as needing care (passed=False) whenever the flag is set."""
    tto = bool(flags.get("test_time_optimization", False))
    values = {"test_time_optimization": tto, "gradient_mode": gradient_mode}
    if not tto:
        return _result("test_time_optimization", True, "no test-time optimisation", values)
    if gradient_mode == "full":
        return _result("test_time_optimization", False, "full-gradient attack on a test-time-optimisation "
                       "purifier: the inner loop masks gradients; use BPDA+EOT", values)
    return _result("test_time_optimization", False, "purifier runs test-time optimisation: robustness claims "
                   "need BPDA+EOT and adaptive attacks; full-gradient results are not reliable", values)


def check_eot(flags: Mapping[str, bool], eot: int, gradient_mode: str | None = None,
              min_draws: int = 2) -> dict[str, Any]:
    """A stochastic purifier attacked with fewer than `min_draws` EOT draws (the classifier-
    only view has no randomness and is exempt)."""
    stochastic = bool(flags.get("stochastic", False))
    values = {"stochastic": stochastic, "eot": int(eot), "gradient_mode": gradient_mode, "min_draws": min_draws}
    if stochastic and gradient_mode != "classifier" and eot < min_draws:
        return _result("eot", False, f"stochastic purifier attacked with eot={eot}: use EOT "
                       f"(≥ {min_draws} draws, e.g. 15–20)", values)
    return _result("eot", True, "EOT draws fit the purifier", values)


# ----------------------------------------------------------------------------- other checks

def check_output_range(logits: torch.Tensor, atol: float = 1e-5) -> dict[str, Any]:
    """Outputs in [0, 1] summing to 1 are probabilities, not logits: CE/DLR gradients on them
    are squashed (a classic source of masking)."""
    z = logits.detach().float().reshape(-1, logits.shape[-1])
    probs = bool((z.min() > -atol) & (z.max() < 1 + atol) & ((z.sum(1) - 1).abs() < atol).all())
    values = {"min": _f(z.min()), "max": _f(z.max()), "looks_like_probabilities": probs}
    if probs:
        return _result("output_range", False, "outputs look like probabilities: attack the logits", values)
    return _result("output_range", True, "outputs are logits", values)


# ----------------------------------------------------------------------------- from a target

def run_gradient_checks(target: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor,
                        y: torch.Tensor, declared_stochastic: bool | None = None,
                        max_zero_fraction: float = 0.0) -> list[dict[str, Any]]:
    """Checks (2) and (1) from an attack target `target(x, step) -> logits [B, R, K]`:
    the input gradient of the mean per-draw CE at step 0; step 0 evaluated twice (same keys
    must agree); steps 0 and 1 (different keys: stochastic?); and the output range.
    Costs three forwards and one backward."""
    x = x.detach().requires_grad_(True)
    logits0 = target(x, 0)
    B, R, K = logits0.shape
    loss = F.cross_entropy(logits0.reshape(B * R, K), y.to(logits0.device).repeat_interleave(R))
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():  # checks only: no gradient needed below
        again = target(x.detach(), 0)
        other = target(x.detach(), 1)
    return [check_gradients(grad, max_zero_fraction),
            check_randomness(logits0, again, same_keys=True),
            check_randomness(logits0, other, same_keys=False, declared_stochastic=declared_stochastic),
            check_output_range(logits0)]


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    failed = [r["name"] for r in results if not r["passed"]]
    return {"passed": not failed, "failed": failed, "checks": [dict(r) for r in results]}
