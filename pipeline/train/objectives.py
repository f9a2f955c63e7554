"""Training objectives as per-batch loss functions for `pipeline.train.loops.fit`.

Each takes the network, a batch and the run's torch.Generator (every random draw comes from
it, in a fixed order, so a seed reproduces a run) and returns the scalar to minimise.
The EBM's negative phase (short-run Langevin chains and where they start) is here too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.purifiers import steps


def classification_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                        augment_noise: float = 0.0) -> torch.Tensor:
    """Cross-entropy, optionally on inputs with Gaussian noise added and clipped to [0, 1]."""
    if augment_noise > 0:
        x = (x + augment_noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return F.cross_entropy(model(x), y)


def denoising_loss(net: nn.Module, x: torch.Tensor, levels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """‖D(clip(x + σ·n, 0, 1)) − x‖² (mean), σ per image: half the batch from the listed
    `levels`, half uniform in [0, max level], so the denoiser is robust to any level."""
    n = len(x)
    pick = levels[torch.randint(len(levels), (n,), generator=gen)]
    unif = torch.rand(n, generator=gen) * levels.max()
    sigma = torch.where(torch.rand(n, generator=gen) < 0.5, pick, unif).view(-1, 1, 1, 1)
    noisy = (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return F.mse_loss(net(noisy), x)


def dsm_loss(net: nn.Module, x: torch.Tensor, sigmas: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise-unconditional denoising score matching, mean over the batch:
    ℓ = ½ ‖f_θ(x + σn) + n‖² summed over pixels, σ drawn per image from `sigmas`.

    This is NCSNv2's anneal_dsm_score_estimation (anneal_power 2) for a network whose
    σ-scaled output f_θ = σ·s_θ is used directly, as ADP does: f_θ(x̃) ≈ −E[n | x̃]."""
    idx = torch.randint(len(sigmas), (x.shape[0],), generator=gen)
    sigma = sigmas[idx].view(-1, *([1] * (x.dim() - 1)))
    n = torch.randn(x.shape, generator=gen)
    f = net(x + sigma * n)  # ≈ −E[n | x̃] = σ·score
    return 0.5 * ((f + n) ** 2).flatten(1).sum(1).mean()


def ml_loss(u_pos: torch.Tensor, u_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Maximum-likelihood EBM loss d = (mean U(X⁺) − mean U(X⁻)) / scale from the energies
    ([N⁺], [N⁻]) (Hill et al. 2021; scale = ε²/2, absorbed into U so that Langevin needs no
    step size)."""
    return (u_pos.mean() - u_neg.mean()) / scale


def energy_dsm_loss(net: nn.Module, x: torch.Tensor, sigma: tuple[float, float], scale: float,
                    gen: torch.Generator) -> torch.Tensor:
    """Denoising score matching for an energy network (ours, for the digits / MNIST recipes):
    ℓ = ½ ‖σ·∇E(x + σn) − n‖² summed over pixels, mean over the batch, E = U / scale, σ per
    image log-uniform on `sigma` = (low, high) (low = high: one level).

    The ideal E then has ∇E(x̃) = E[x̃ − x | x̃] / σ², so a Langevin chain X ← X − ∇U + εZ
    contracts towards the data at rate ε²/(2σ²) per step and settles within about σ of it:
    the restoring force that keeps 1,500-step chains metastable, which a few thousand ML
    updates alone do not build (docs/adp_ebm.md)."""
    lo, hi = sigma
    u = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=gen)
    sigma_i = lo * (hi / lo) ** u
    n = torch.randn(x.shape, generator=gen)
    x_t = (x + sigma_i * n).requires_grad_(True)
    grad_e = torch.autograd.grad(net(x_t).sum() / scale, x_t, create_graph=True)[0]
    return 0.5 * ((sigma_i * grad_e - n) ** 2).flatten(1).sum(1).mean()


def langevin_chain(net: nn.Module, x: torch.Tensor, n_steps: int, eps: float, gen: torch.Generator
                   ) -> tuple[torch.Tensor, float]:
    """Short-run chain X ← X − ∇U(X) + ε·Z without a graph (negatives are constants for the
    loss); returns (samples, mean ‖∇U‖ per image along the path)."""
    grad_norm = 0.0
    for _ in range(n_steps):
        g = steps.energy_grad(net, x)  # x carries no graph: plain ∇U
        z = torch.randn(x.shape, generator=gen)
        x = steps.langevin_step(x, g, eps, z).detach()
        grad_norm += g.flatten(1).norm(dim=1).mean().item()
    return x, grad_norm / max(1, n_steps)


def noisy_starts(data: torch.Tensor, idx: torch.Tensor, sigma_max: float, gen: torch.Generator) -> torch.Tensor:
    """Training images (on [−1, 1]) with pixel noise σ ~ U(0, sigma_max) per image added on
    the [0, 1] scale and clipped there: clip(x + σ·n, 0, 1), mapped back to [−1, 1]."""
    x = data[idx]
    if sigma_max <= 0:
        return x.clone()
    sigma = sigma_max * torch.rand((len(idx),) + (1,) * (x.dim() - 1), generator=gen)
    pix = (x + 1.0) * 0.5 + sigma * torch.randn(x.shape, generator=gen)
    return 2.0 * pix.clamp(0.0, 1.0) - 1.0


CHAIN_INITS = ("persistent", "data_persistent", "uniform", "data", "gaussian")


class ChainStarts:
    """Where each batch's short-run chains begin (data on [−1, 1]).

    persistent       the reference (ebm-defense): a bank of states, one per training image
                     (or `bank_size`), initialised uniform on [−1, 1]; chains continue from
                     drawn states and their results go back into the bank
    data_persistent  EBM Life Cycle (point0bar1/ebm-life-cycle): the bank starts at training
                     images, with `start_sigma` pixel noise (`noisy_starts`, ours) — the states a
                     purifier is handed — so the model learns from chains that begin there
    uniform / data / gaussian   a fresh start every batch (reference options; `data` = X⁺)

    With `rejuvenate` p > 0 each drawn bank state is replaced by a fresh start with
    probability p before its chain runs (uniform noise, or noisy data for data_persistent).
    """

    def __init__(self, init: str, data: torch.Tensor, gen: torch.Generator, *, rejuvenate: float = 0.0,
                 start_sigma: float = 0.0, bank_size: int | None = None):
        if init not in CHAIN_INITS:
            raise ValueError(f"init must be one of {CHAIN_INITS}")
        if not 0.0 <= rejuvenate <= 1.0:
            raise ValueError("need 0 ≤ rejuvenate ≤ 1")
        self.init, self.data, self.gen = init, data, gen
        self.rejuvenate, self.start_sigma = rejuvenate, start_sigma
        self.bank = self.fresh(bank_size or len(data)) if init.endswith("persistent") else None

    def fresh(self, n: int) -> torch.Tensor:
        """n new bank states."""
        if self.init == "data_persistent":
            idx = torch.randint(0, len(self.data), (n,), generator=self.gen)
            return noisy_starts(self.data, idx, self.start_sigma, self.gen)
        return 2.0 * torch.rand((n,) + tuple(self.data.shape[1:]), generator=self.gen) - 1.0

    def draw(self, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(chain starts for a batch like `positives`, bank indices to `put_back` or None)."""
        if self.bank is not None:
            idx = torch.randperm(len(self.bank), generator=self.gen)[:len(positives)]
            x0 = self.bank[idx]
            if self.rejuvenate > 0:
                renew = torch.rand(len(idx), generator=self.gen) < self.rejuvenate
                if renew.any():
                    x0[renew] = self.fresh(int(renew.sum()))
            return x0, idx
        if self.init == "uniform":
            return 2.0 * torch.rand(positives.shape, generator=self.gen) - 1.0, None
        if self.init == "gaussian":
            return torch.randn(positives.shape, generator=self.gen), None
        return positives.clone(), None

    def put_back(self, idx: torch.Tensor | None, states: torch.Tensor) -> None:
        if idx is not None:
            self.bank[idx] = states


def ddpm_loss(net: nn.Module, x: torch.Tensor, alphas_cumprod: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """DDPM's simple ε-objective (Ho et al. 2020, Algorithm 1), mean over pixels and batch:
    ‖ε − ε̂(√ᾱᵢ·x + √(1 − ᾱᵢ)·ε, i)‖², i uniform on 0…N−1, x on [−1, 1], with the discrete
    ᾱ of the VP schedule DiffPure purifies with (vpsde.VPSchedule)."""
    i = torch.randint(len(alphas_cumprod), (x.shape[0],), generator=gen)
    abar = alphas_cumprod[i].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    eps = torch.randn(x.shape, generator=gen)
    x_t = abar.sqrt() * x + (1.0 - abar).sqrt() * eps
    return F.mse_loss(net(x_t, i), eps)
