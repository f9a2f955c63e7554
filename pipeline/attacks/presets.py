"""Published attack protocols as named presets that expand to `attacks:` config entries.

Each entry is a plain dict {name, params, gradient, eot} — the keys of `AttackConfig` — plus
`surrogate` only where a preset uses one (see "lee_kim2023"). Use:

    entries = expand_preset("hill2021")                        # the paper's settings
    entries = expand_preset("hill2021", {"eps": 0.3, "eot": 5})  # overridden
    entries = expand_preset("adp2021", {"eps": [2/255, 4/255, 8/255]})  # one entry per ε

Override keys: `gradient`, `eot`, `surrogate` set the entry; `name` is not overridable; every
other key is an attack parameter, set on the entries whose attack takes it (so `steps` reaches
the APGD entries of a preset that also runs Square) and an error if no entry's attack does. A
list for `eps` expands to one entry per value (the ε sweep the monotonicity check needs).

`surrogate` (dict of purifier-parameter overrides) means: compute the attack's gradient
through a purifier built from the defended purifier's params updated by these, e.g.
{"steps": 5} for a diffusion purifier run with fewer steps (Lee & Kim 2023); evaluation and
any re-check use the real purifier. An empty/absent surrogate means the real purifier.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

ENTRY_KEYS = ("gradient", "eot", "surrogate")


@dataclass(frozen=True)
class Preset:
    name: str
    reference: str
    description: str
    entries: tuple[dict[str, Any], ...]
    paper: str                      # what is taken from the paper
    ours: str = ""                  # what is our choice / deviation
    notes: tuple[str, ...] = field(default_factory=tuple)
    # the reference runs the entries as a cascade (each on the samples no earlier one broke:
    # AutoAttack's run_standard_evaluation); `evaluation.cascade: auto` follows it
    cascade: bool = False


def _entry(name: str, params: dict[str, Any], gradient: str = "auto", eot: int = 1,
           surrogate: dict[str, Any] | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"name": name, "params": dict(params), "gradient": gradient, "eot": int(eot)}
    if surrogate:
        e["surrogate"] = dict(surrogate)
    return e


EPS_8 = 8 / 255
STEP_2 = 2 / 255

PRESETS: dict[str, Preset] = {}


def runs_as_cascade(names: list[str]) -> bool:
    """True when every name is a preset whose reference runs its entries as a cascade."""
    return bool(names) and all(n in PRESETS and PRESETS[n].cascade for n in names)


def _register(p: Preset) -> None:
    if p.name in PRESETS:
        raise ValueError(f"preset {p.name!r} registered twice")
    PRESETS[p.name] = p


_register(Preset(
    name="hill2021",
    reference="Hill, Mitchell, Zhu, 'Stochastic Security: Adversarial Defense Using Long-Run "
              "Dynamics of Energy-Based Models', ICLR 2021",
    description="BPDA+EOT PGD: 50 ℓ∞ steps of 2/255 in ε = 8/255 from a random start, EOT over 15 "
                "purification draws on the CE of the mean logits; a candidate break is confirmed "
                "with H = 150 draws of the real defense and stays broken.",
    entries=(_entry("pgd", {"eps": EPS_8, "steps": 50, "step_size": STEP_2, "norm": "linf",
                            "random_start": True, "eot_reduction": "mean_logits",
                            "keep_broken": True, "recheck_draws": 150},
                    gradient="bpda", eot=15),),
    paper="steps 50, ε 8/255, step 2/255, random start, EOT_attack 15 (logits averaged), BPDA, "
          "EOT_defense H = 150 (logits averaged) re-check of every candidate, once broken stays broken; "
          "iterates 0…50 are all checked",
    ours="by default the clean and final accuracies are our R-run evaluations (the paper reports the "
         "re-check record itself, which `evaluation.verdict: recheck` keeps); re-check draws are keyed per "
         "(sample, step)",
))

_register(Preset(
    name="adp2021",
    reference="Yoon, Hwang, Lee, 'Adversarial Purification with Score-based Generative Models', ICML 2021",
    description="BPDA+EOT PGD: 40 ℓ∞ steps of 2/255 in ε = 8/255 from the clean image, the step "
                "direction the sign of the summed signs of 15 per-draw gradients.",
    entries=(_entry("pgd", {"eps": EPS_8, "steps": 40, "step_size": STEP_2, "norm": "linf",
                            "random_start": False, "eot_reduction": "sign_sum"},
                    gradient="bpda", eot=15),),
    paper="40 steps, ε 8/255, step 2/255, no random start, EOT 15, per-draw signed steps summed then signed, "
          "BPDA through the purifier",
    ours="per-draw gradient is the CE gradient of the classifier at the purified draw (the paper takes a "
         "1-step foolbox PGD on it, whose direction is the same sign up to clipping at [0, 1])",
))

_register(Preset(
    name="lee_kim2023",
    reference="Lee & Kim, 'Robust Evaluation of Diffusion-Based Adversarial Purification', ICCV 2023",
    description="Full-gradient PGD-EOT: 200 ℓ∞ steps of 0.007 in ε = 8/255 from the clean image, "
                "gradients averaged over 20 draws, back-propagated through a surrogate purification "
                "process (the purifier with fewer/other steps: override `surrogate`).",
    entries=(_entry("pgd", {"eps": EPS_8, "steps": 200, "step_size": 0.007, "norm": "linf",
                            "random_start": False, "eot_reduction": "mean_loss"},
                    gradient="full", eot=20),),
    paper="PGD 200 iterations, EOT 20 (mean of per-draw gradients), step 0.007, ε 8/255, no random start, "
          "exact gradient through a surrogate of the purification process",
    ours="the surrogate is expressed as purifier-parameter overrides (`surrogate: {steps: 5}`); by default "
         "none (the real purifier), which is what the paper does when its process is affordable",
))

# ----------------------------------------------------------------------------- AutoAttack
# Source: Croce & Hein, ICML 2020, and the code behind the published AutoAttack numbers,
# fra31/auto-attack: autoattack/autoattack.py (set_version), autopgd_base.py, square.py.
AUTOATTACK_REF = ("Croce & Hein, 'Reliable evaluation of adversarial robustness with an ensemble of diverse "
                  "parameter-free attacks', ICML 2020; AutoAttack code fra31/auto-attack (autoattack.py "
                  "set_version, autopgd_base.py, square.py)")
# Deviations every APGD entry below shares (ours, see docs/attacks.md)
APGD_DEVIATIONS = ("random start uniform in the ε-ball (AutoAttack: a random point scaled onto the "
                   "ball's surface); after a step-size halving the restart from the best point carries no "
                   "momentum (AutoAttack keeps x_best − x_prev); loss and success are taken on the mean "
                   "over the EOT draws (AutoAttack: the last draw's)")


def _apgd(**params: Any) -> dict[str, Any]:
    """AutoAttack's APGD settings: ℓ∞ ε = 8/255, 100 steps, 1 restart, ρ 0.75, its schedule."""
    base = {"eps": EPS_8, "steps": 100, "norm": "linf", "restarts": 1, "rho": 0.75,
            "schedule": "autoattack", "eot_reduction": "mean_loss"}
    return {**base, **params}


_register(Preset(
    name="autoattack_rand",
    reference=AUTOATTACK_REF + " — version='rand', for randomized defenses",
    description="AutoAttack version 'rand': APGD-CE then APGD-DLR, 100 steps and 1 restart each, "
                "the gradient averaged over EOT 20 draws, AutoAttack's checkpoint schedule; "
                "ℓ∞ ε = 8/255 by default. Deviations: see `ours`.",
    entries=(_entry("apgd", _apgd(loss="ce"), gradient="auto", eot=20),
             _entry("apgd", _apgd(loss="dlr"), gradient="auto", eot=20)),
    paper="attacks_to_run ['apgd-ce', 'apgd-dlr']; APGD n_iter 100, n_restarts 1, eot_iter 20 (mean of "
          "20 per-draw gradients), rho 0.75, checkpoint schedule and halving test of autopgd_base.py",
    ours="ε 8/255 ℓ∞ is a default to override; the gradient mode is our honest choice per purifier "
         "(auto); a sample counts as broken if either entry breaks it at any iterate (a confirmed break; "
         "AutoAttack checks one draw after each attack); run as AutoAttack's cascade by default "
         "(evaluation.cascade auto: APGD-DLR on APGD-CE's survivors); " + APGD_DEVIATIONS,
    cascade=True,
))

_register(Preset(
    name="autoattack_standard",
    reference=AUTOATTACK_REF + " — version='standard', for deterministic defenses",
    description="AutoAttack version 'standard' without FAB-T: APGD-CE (100 steps, no restarts), "
                "APGD-T with the targeted DLR loss over the 9 most likely wrong classes (100 steps "
                "each), Square with 5,000 queries; ℓ∞ ε = 8/255 by default, no EOT. FAB-T is not "
                "implemented, so robust accuracy can only be ≥ full AutoAttack's.",
    entries=(_entry("apgd", _apgd(loss="ce"), gradient="auto", eot=1),
             _entry("apgd", _apgd(loss="dlr", targeted=True, target_mode="top", n_target_classes=9,
                                  targeted_success="misclassified"), gradient="auto", eot=1),
             _entry("square", {"eps": EPS_8, "norm": "linf", "n_queries": 5000, "p_init": 0.8,
                               "rescale_schedule": False}, gradient="auto", eot=1)),
    paper="attacks_to_run ['apgd-ce', 'apgd-t', 'fab-t', 'square']; APGD-CE n_restarts 1; APGD-T 9 "
          "target classes, 1 restart, DLR-targeted loss, any misclassification counts; Square "
          "n_queries 5000, p_init 0.8, margin loss, resc_schedule False; n_iter 100, rho 0.75",
    ours="FAB-T left out (not implemented); ε 8/255 ℓ∞ a default to override; Square draws its "
         "squares per sample from keyed noise (AutoAttack: one square per batch iteration); " + APGD_DEVIATIONS,
    notes=("for randomized defenses use autoattack_rand (AutoAttack's own advice)",),
    cascade=True,
))

_register(Preset(
    name="diffpure2022",
    reference="Nie, Guo, Huang, Xiao, Vahdat, Anandkumar, 'Diffusion Models for Adversarial Purification', "
              "ICML 2022 (arXiv:2205.07460), Sec. 5; code NVlabs/DiffPure; attacks: " + AUTOATTACK_REF,
    description="DiffPure's evaluation: AutoAttack 'rand' (APGD-CE, APGD-DLR, EOT 20) and 'standard' "
                "(APGD-CE, APGD-T, Square; FAB-T left out) with gradients through the purifier, ℓ∞ ε = "
                "8/255 by default; the paper reports the lower of the two versions' accuracies.",
    entries=PRESETS["autoattack_rand"].entries + PRESETS["autoattack_standard"].entries,
    paper="both AutoAttack versions, EOT 20 for 'rand', the full gradient through the purifier (the paper's "
          "from torchsde's adjoint: set the diffpure purifier's gradient_method: adjoint), robust accuracy = "
          "min of the two versions; ε 8/255 ℓ∞ (CIFAR-10, t* 0.1), 4/255 (ImageNet, t* 0.15); 512 test images",
    ours="the headline is the per-sample worst case over all five entries, which is ≤ the min of the two "
         "versions' accuracies; FAB-T left out; the purifier's default gradient is exact (checkpointed), "
         "stronger than the paper's adjoint; the APGD and Square differences of the two AutoAttack presets",
    cascade=True,
))

# The exact gradient Chen et al. take through DiffPure's solver: the purifier's checkpointed
# unrolled solver, whatever gradient the defended purifier is configured with (a config that
# sets `gradient_method: adjoint` for diffpure2022 still gets the exact gradient here).
EXACT_SOLVER = {"gradient_method": "exact"}

_register(Preset(
    name="chen2024",
    reference="Chen, Dong, Wang, Yang, Duan, Su, Zhu, 'Robust Classification via a Single Diffusion Model', "
              "ICML 2024 (arXiv:2305.15241), its evaluation of DiffPure; code huanranchen/DiffusionClassifier "
              "(experiments/DiffAttack.py, tester/AutoAttack.py, defenses/.../sampler/BaseSampler.py)",
    description="Exact-gradient attacks on DiffPure: PGD without random start, 200 ℓ∞ steps in ε = 8/255, "
                "the CE gradient averaged over 32 purification draws, and APGD-DLR (AutoAttack's, 100 "
                "steps) with EOT 20, both backpropagated through the whole checkpointed solver (not the "
                "adjoint). The ℓ∞ step size is not in the authors' released code: 2/255 here is ours.",
    entries=(_entry("pgd", {"eps": EPS_8, "steps": 200, "step_size": STEP_2, "norm": "linf",
                            "random_start": False, "eot_reduction": "mean_loss"},
                    gradient="full", eot=32, surrogate=EXACT_SOLVER),
             _entry("apgd", _apgd(loss="dlr"), gradient="full", eot=20, surrogate=EXACT_SOLVER)),
    paper="the exact gradient through DiffPure's SDE solver by gradient checkpointing (the network checkpointed "
          "at every solver step, torchsde Euler dt 1e-3), not the adjoint; from the authors' DiffPure attack "
          "script: BIM = PGD without random start, 200 steps, EOT 32 (CE gradient averaged over the draws), "
          "written there for ℓ2 ε 0.5 (step 0.1), and APGD-DLR with eot_iter 20, n_iter 100 (AutoAttack "
          "'custom', apgd-dlr only); their ImageNet ℓ∞ script: 80 steps of 1/255, EOT 20, ε 4/255. "
          "The ℓ∞ ε 8/255 CIFAR-10 setting (WRN-70-16, 71.29 % under the adjoint → 44.53 %) is as the issue "
          "cites it; the paper's text was not at hand to check the figure or which attack gave it",
    ours="the ℓ∞ step size 2/255 (ε/4, the ratio of their ImageNet ℓ∞ script; the released CIFAR-10 script "
         "is ℓ2) is ours, and so is running both attacks in one preset (the released script runs PGD, "
         "APGD-DLR is commented out beside it); the exact gradient is forced by the surrogate "
         "{gradient_method: exact} (no second network when the purifier is already exact), so the preset "
         "is for the diffpure purifier: give `surrogate: {}` to use it on another; " + APGD_DEVIATIONS,
    notes=("ImageNet as their script: overrides {eps: 4/255, steps: 80, step_size: 1/255, eot: 20}",
           "ℓ2 as their CIFAR-10 script: overrides {norm: l2, eps: 0.5, step_size: 0.1}"),
))

_register(Preset(
    name="advpure_apgd_eot",
    reference="ours, built from Croce & Hein, ICML 2020 (APGD-CE, APGD-T) with EOT as in Croce et al. "
              "2022 'Evaluating the adversarial robustness of adaptive test-time defenses'",
    description="Our combination, not a published protocol: APGD-CE (100 steps) then APGD-T with the "
                "targeted DLR loss over 9 target classes, EOT over 20 draws for both, honest "
                "gradient (auto), AutoAttack's checkpoint schedule.",
    entries=(_entry("apgd", {"eps": EPS_8, "steps": 100, "norm": "linf", "loss": "ce",
                             "eot_reduction": "mean_loss"}, gradient="auto", eot=20),
             _entry("apgd", {"eps": EPS_8, "steps": 100, "norm": "linf", "loss": "dlr", "targeted": True,
                             "target_mode": "top", "n_target_classes": 9, "eot_reduction": "mean_loss"},
                    gradient="auto", eot=20)),
    paper="APGD schedule and losses as in AutoAttack's code; EOT 20 as AutoAttack's 'rand' version",
    ours="the whole combination is ours: AutoAttack 'rand' runs APGD-CE + APGD-DLR (see autoattack_rand), "
         "'standard' adds FAB-T and Square without EOT; here an APGD-T break must hit its target class",
))

_register(Preset(
    name="sanity_sweep",
    reference="Carlini et al. 2019 'On Evaluating Adversarial Robustness' (§5 checklist)",
    description="PGD at ε ∈ {1, 2, 4, 8, 16}/255 and the unbounded ε = 1, for the monotonicity and "
                "unbounded-ε gradient-masking checks (pipeline.evaluation.checks).",
    entries=tuple(_entry("pgd", {"eps": e, "steps": 40, "norm": "linf", "random_start": True},
                         gradient="auto", eot=1)
                  for e in (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 1.0)),
    paper="the checklist's advice: accuracy must fall with ε and reach 0 when ε is unbounded",
    ours="ε grid, 40 steps with step 2.5·ε/40",
))


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown attack preset {name!r}; known: {', '.join(preset_names())}")
    return PRESETS[name]


def _check_params(attack: str, params: dict[str, Any]) -> None:
    from pipeline.registry import ATTACKS

    ctor: Callable[..., Any] = ATTACKS.get(attack)
    try:
        inspect.signature(ctor).bind(**params)
    except TypeError as err:
        raise ValueError(f"preset parameters for attack {attack!r}: {err}") from None


def _accepts(attack: str, key: str) -> bool:
    from pipeline.registry import ATTACKS

    params = inspect.signature(ATTACKS.get(attack)).parameters
    return key in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def expand_preset(name: str, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The preset's `attacks:` entries with `overrides` applied (new dicts every call)."""
    preset = get_preset(name)
    overrides = dict(overrides or {})
    if "name" in overrides:
        raise ValueError("a preset's attack name cannot be overridden")
    entry_over = {k: overrides.pop(k) for k in ENTRY_KEYS if k in overrides}
    eps_values = overrides.pop("eps", None)
    unused = sorted(k for k in overrides if not any(_accepts(b["name"], k) for b in preset.entries))
    if unused:
        raise ValueError(f"preset {name!r}: unexpected parameters {unused} (no attack of the preset takes them)")
    out = []
    for base in preset.entries:
        e = copy.deepcopy(base)
        e["params"].update({k: copy.deepcopy(v) for k, v in overrides.items() if _accepts(e["name"], k)})
        for k, v in entry_over.items():
            if k == "surrogate":
                if v:
                    e["surrogate"] = dict(v)
                else:
                    e.pop("surrogate", None)
            else:
                e[k] = v
        sweep = eps_values if isinstance(eps_values, (list, tuple)) else [eps_values]
        for eps in sweep:
            ee = copy.deepcopy(e)
            if eps is not None:
                ee["params"]["eps"] = float(eps)
            _check_params(ee["name"], ee["params"])
            out.append(ee)
    return out
