"""What a worker runs, built once from the job's config: the defense (classifier ∘
purifier), the planned attacks (each with its resolved gradient mode, EOT draws, optional
surrogate and the draws that confirm its breaks), and the protocol settings (seed, R runs,
decision rule, batch size, cascade, device)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import config as config_mod
from pipeline.attacks.base import Attack
from pipeline.config import Config
from pipeline.evaluation import row_chunks
from pipeline.evaluation.defense import Defense, honest_gradient_mode, speed_up
from pipeline.io import checkpoints, storage
from pipeline.registry import ATTACKS, CLASSIFIERS, PURIFIERS
from pipeline.vocabulary import ADAPTIVE_GRADIENT_MODES, NO_ATTACK_NAME


@dataclass
class PlannedAttack:
    index: int
    name: str
    attack: Attack
    gradient: str      # resolved: full | bpda | classifier
    eot: int
    surrogate: Defense | None = None   # the defense the gradient goes through, if not the real one
    confirm_draws: int = 0             # fresh draws of the real defense that confirm a break (0: exact)

    def info(self) -> dict[str, Any]:
        """The attack's columns of a record."""
        params = self.attack.params()
        if self.surrogate is not None:
            params = {**params, "surrogate": self.surrogate.purifier.record()}
        eps = float(params.get("eps", 0.0))
        return {"attack_index": self.index, "attack_name": self.name,
                "attack_params": json.dumps(params, sort_keys=True), "gradient_mode": self.gradient,
                "eot": self.eot, "norm": params.get("norm"), "eps": eps, "eps_255": eps * 255.0,
                "confirm_draws": self.confirm_draws}


NO_ATTACK = {"attack_index": -1, "attack_name": NO_ATTACK_NAME, "attack_params": "{}", "gradient_mode": "none",
             "eot": 0, "norm": None, "eps": 0.0, "eps_255": 0.0, "confirm_draws": 0}


@dataclass
class Protocol:
    defense: Defense
    attacks: list[PlannedAttack]
    seed: int
    runs: int                      # R purification runs per evaluation
    decision: str                  # how the R runs decide: mean_logit | vote | mean_softmax
    batch_size: int
    cascade: bool
    eot_probe: int                 # samples of a shard's first batch for the EOT-doubling probe
    device: torch.device
    provenance: dict[str, Any]     # the record columns that identify job, config and models
    max_rows: int | str = row_chunks.AUTO   # evaluation.max_rows as configured (an int pins it)
    rows_choice: row_chunks.Choice | None = None   # the chunk in force, once settled (row_chunks.settle)
    # evaluation.channels_last: true/false as configured, or auto (settled with the chunk: memory_format)
    channels_last: bool | str = False
    # gradient-masking check samples of the shard at hand: the job's evaluation.check_samples,
    # of which the worker sets each shard's share (stages.check_share)
    check_samples: int = 16
    # evaluation.attack_misclassified: false gates the evaluate stage's attacks on the clean
    # verdict (batch.attacked_mask); true attacks every sample
    attack_misclassified: bool = False
    # evaluation.verdict: runs (R-run evaluations decide) or recheck (the attacks' confirmed
    # breaks and a nominated, re-checked clean evaluation decide: batch._clean_by_recheck)
    verdict: str = "runs"


def resolve_gradient(requested: str, defense: Defense) -> str:
    return honest_gradient_mode(defense.purifier) if requested == "auto" else requested


def confirm_draws(attack: Attack, gradient: str, surrogate: Defense | None, defense: Defense,
                  runs: int, configured: int | None) -> int:
    """How many fresh draws of the real defense confirm a candidate break.

    0 where the attack's own forward *is* the deployed defense (deterministic purifier, view
    through the real purifier): the forward is exact. Otherwise the attack's forward is only
    a nomination (its own EOT draws, a bare classifier or a surrogate): a deterministic
    defense confirms with 1 evaluation, a stochastic one with the attack's `recheck_draws`
    (Hill et al.), else `evaluation.confirm_draws`, else R — the draws the defense decides with.
    """
    if attack.recheck_draws:
        return attack.recheck_draws
    exact_view = gradient in ADAPTIVE_GRADIENT_MODES and surrogate is None
    if not defense.purifier.stochastic:
        return 0 if exact_view else 1
    return configured or runs


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("evaluation.device is cuda but no GPU is visible to this worker")
        return torch.device("cuda")
    return torch.device("cpu")


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)  # attacks need input gradients only
    return module.eval()


def _checksum_params(params: dict[str, Any]) -> str:
    """sha256 of the first checkpoint-like file among a component's params ('' if none)."""
    for name, value in sorted(params.items()):
        if config_mod.is_file_param(name) and isinstance(value, str) and storage.exists(value):
            return checkpoints.sha256(value)
    return ""


def _plan_attacks(cfg: Config, defense: Defense) -> list[PlannedAttack]:
    ev = cfg.evaluation
    planned = []
    for i, a in enumerate(cfg.attacks):
        surrogate = None
        if a.surrogate:  # the gradient goes through a cheaper copy; evaluation uses the real one
            checkpoint, settings = PURIFIERS.parse(cfg.purifier.name, cfg.purifier.params, "purifier.params")
            changed = settings.replace(a.surrogate, f"attacks[{i}].surrogate")
            if changed != settings:  # e.g. chen2024's {gradient_method: exact} on an exact purifier: no copy
                sp = _frozen(PURIFIERS.get(cfg.purifier.name)(checkpoint, changed))
                surrogate = Defense(defense.classifier, sp, row_chunks.initial_rows(ev.max_rows))
        attack = ATTACKS.build(a.name, **a.params)
        gradient = resolve_gradient(a.gradient, surrogate or defense)
        draws = confirm_draws(attack, gradient, surrogate, defense, ev.runs, ev.confirm_draws)
        planned.append(PlannedAttack(i, a.name, attack, gradient, a.eot, surrogate, draws))
    return planned


def build_protocol(cfg: Config) -> Protocol:
    device = pick_device(cfg.evaluation.device)
    ev = cfg.evaluation
    classifier = _frozen(CLASSIFIERS.build(cfg.classifier.name, **cfg.classifier.params)).to(device)
    purifier = _frozen(PURIFIERS.build(cfg.purifier.name, **cfg.purifier.params)).to(device)
    classifier = speed_up(classifier, purifier, ev.precision, ev.channels_last is True, ev.compile)
    defense = Defense(classifier, purifier, row_chunks.initial_rows(ev.max_rows)).to(device)
    attacks = _plan_attacks(cfg, defense)
    for a in attacks:
        if a.surrogate is not None:
            a.surrogate.to(device)
            speed_up(classifier, a.surrogate.purifier, ev.precision, ev.channels_last is True, ev.compile)
    provenance = {
        "job": cfg.job.name, "config_hash": cfg.hash(), "seed": cfg.job.seed,
        "classifier": cfg.classifier.name, "classifier_sha256": _checksum_params(cfg.classifier.params),
        "purifier": cfg.purifier.name, "purifier_sha256": _checksum_params(cfg.purifier.params),
        "purifier_params": json.dumps({**cfg.purifier.params, **purifier.record()}, sort_keys=True, default=str),
    }
    if not isinstance(ev.cascade, bool):   # config.from_dict resolves auto from the attack list
        raise ValueError(f"evaluation.cascade {ev.cascade!r} unresolved: build the Config with config.from_dict")
    return Protocol(defense, attacks, cfg.job.seed, ev.runs, ev.decision, cfg.data.batch_size, ev.cascade,
                    ev.eot_probe, device, provenance, ev.max_rows, channels_last=ev.channels_last,
                    check_samples=ev.check_samples,
                    attack_misclassified=ev.attack_misclassified, verdict=ev.verdict)
