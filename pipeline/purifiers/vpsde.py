"""The VP-SDE of DiffPure as pure tensor math: schedule, forward diffusion, solver steps.

References
- [SDE] Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole, "Score-Based Generative Modeling
  through Stochastic Differential Equations", ICLR 2021 (arXiv:2011.13456): the VP-SDE
  dx = −½β(t)x dt + √β(t) dw with β(t) = β_min + t(β_max − β_min) (Eq. 11), its reverse-time
  SDE dx = [f − g²∇log p_t] dt + g dw̄ (Eq. 6) and probability-flow ODE
  dx = [f − ½g²∇log p_t] dt (Eq. 13).
- [DDPM] Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020
  (arXiv:2006.11239): discrete βᵢ, ᾱᵢ = Πⱼ≤ᵢ(1 − βⱼ) (Eq. 4), the posterior q(x_{i−1} | x_i, x₀)
  (Eq. 6–7) and the ancestral sampler (Algorithm 2).
- [DiffPure] Nie, Guo, Huang, Xiao, Vahdat, Anandkumar, "Diffusion Models for Adversarial
  Purification", ICML 2022 (arXiv:2205.07460), Eq. 3–4: diffuse the input to t*, then solve
  the reverse SDE from t* to 0.

Time runs from t* down to t_end (DiffPure's 1e-5) on a uniform grid of n = ⌈(t* − t_end)/dt⌉
steps. The official code hands torchsde dt = 1e-3 over [1 − t*, 1 − 1e-5], which takes 99
steps of 1e-3 and a last one of 0.99e-3; our n equal steps of (t* − t_end)/n (0.9999e-3 at
t* = 0.1) keep the step count and move every time point by less than 1e-5, and give the
stochastic adjoint a grid it can retrace exactly in reverse (diffpure.KeyedBrownian).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VPSchedule:
    """β(t) = β_min + t(β_max − β_min) on t ∈ [0, 1] and its N-step discretisation
    βᵢ = linspace(β_min/N, β_max/N, N)ᵢ (DDPM's, as score_sde and DiffPure build it)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    n_steps: int = 1000

    def beta(self, t: float) -> float:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t: float) -> float:
        """log ᾱ(t) = −∫₀ᵗ β = −½t²(β_max − β_min) − tβ_min (the continuous ᾱ)."""
        return -0.5 * t * t * (self.beta_max - self.beta_min) - t * self.beta_min

    def sigma(self, t: float) -> float:
        """Marginal std √(1 − ᾱ(t)) of x_t given x₀ (score_sde's marginal_prob std)."""
        return math.sqrt(-math.expm1(self.log_alpha_bar(t)))

    def discrete_betas(self) -> torch.Tensor:
        """float64 [N]; callers cast (DiffPure builds them in float32: the difference in
        ᾱ at i = 99 is below 1e-7)."""
        return torch.linspace(self.beta_min / self.n_steps, self.beta_max / self.n_steps, self.n_steps,
                              dtype=torch.float64)

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱᵢ = Πⱼ≤ᵢ (1 − βⱼ), float64 [N] ([DDPM] Eq. 4)."""
        return torch.cumprod(1.0 - self.discrete_betas(), 0)

    def level(self, t_star: float) -> int:
        """The discrete level DiffPure diffuses to: round(t*·N) (its integer `t` argument)."""
        return int(round(t_star * self.n_steps))


def time_grid(t_star: float, dt: float, t_end: float) -> list[tuple[float, float]]:
    """[(t_k, h_k)]: n = ⌈(t* − t_end)/dt⌉ equal steps from t* down to t_end (see module doc)."""
    n = max(1, math.ceil((t_star - t_end) / dt - 1e-9))
    h = (t_star - t_end) / n
    return [(t_star - k * h, h) for k in range(n)]


def diffuse(x0: torch.Tensor, alpha_bar: float, z: torch.Tensor) -> torch.Tensor:
    """x = √ᾱ·x₀ + √(1 − ᾱ)·z, DiffPure's forward diffusion with the discrete ᾱ_{level−1}."""
    return math.sqrt(alpha_bar) * x0 + math.sqrt(1.0 - alpha_bar) * z


def reverse_sde_step(x: torch.Tensor, score: torch.Tensor, beta: float, h: float, z: torch.Tensor) -> torch.Tensor:
    """Euler–Maruyama for the reverse VP-SDE ([SDE] Eq. 6) from t to t − h:
    x ← x + (½βx + β·s)h + √(βh)·z. The drift is evaluated at the left end t (Itô),
    as torchsde's `euler` in DiffPure's reversed time t' = 1 − t."""
    return x + (0.5 * beta * h) * x + (beta * h) * score + math.sqrt(beta * h) * z


def reverse_ode_step(x: torch.Tensor, score: torch.Tensor, beta: float, h: float) -> torch.Tensor:
    """Euler for the probability-flow ODE ([SDE] Eq. 13) from t to t − h: x ← x + ½β(x + s)h."""
    return x + (0.5 * beta * h) * (x + score)


def posterior(alphas_cumprod: torch.Tensor, i: int) -> tuple[float, float, float, float]:
    """q(x_{i−1} | x_i, x₀) ([DDPM] Eq. 7) as (coef_x0, coef_xi, variance, clipped log variance).

    At i = 0 the variance is 0; its log is clipped to the value at i = 1, as guided-diffusion."""
    abar = alphas_cumprod.tolist()

    def parts(j: int) -> tuple[float, float, float]:
        prev = abar[j - 1] if j > 0 else 1.0
        beta = 1.0 - abar[j] / prev
        var = beta * (1.0 - prev) / (1.0 - abar[j])
        return prev, beta, var
    prev, beta, var = parts(i)
    c0 = beta * math.sqrt(prev) / (1.0 - abar[i])
    ci = (1.0 - prev) * math.sqrt(1.0 - beta) / (1.0 - abar[i])
    log_var = math.log(var if i > 0 else parts(1)[2])
    return c0, ci, var, log_var


def ddpm_step(x: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, i: int, z: torch.Tensor,
              var_frac: torch.Tensor | None = None, clip_x0: bool = True) -> torch.Tensor:
    """One ancestral step x_i → x_{i−1} ([DDPM] Algorithm 2, guided-diffusion's p_sample):
    x̂₀ = (x − √(1−ᾱᵢ)ε)/√ᾱᵢ, clipped to [−1, 1]; mean = posterior mean from (x̂₀, x);
    log variance = frac·log βᵢ + (1 − frac)·log β̃ᵢ with frac = (v + 1)/2 from a learned-σ
    output v (guided-diffusion's learned range), else the posterior β̃ᵢ (fixed small).
    No noise at i = 0."""
    abar = float(alphas_cumprod[i])
    x0 = (x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    c0, ci, _, log_post = posterior(alphas_cumprod, i)
    mean = c0 * x0 + ci * x
    if i == 0:
        return mean
    if var_frac is None:
        return mean + math.exp(0.5 * log_post) * z
    prev = float(alphas_cumprod[i - 1])
    log_beta = math.log(1.0 - abar / prev)
    log_var = var_frac * log_beta + (1.0 - var_frac) * log_post
    return mean + torch.exp(0.5 * log_var) * z
