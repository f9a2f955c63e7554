"""One reference side of benchmarks/hill_reference.py, in its own process: the official Hill et
al. script (point0bar1/ebm-defense `bpda_eot_attack.py`, run from a copy the user fetched) or,
without one, a re-statement of the same protocol in plain PyTorch.

    python benchmarks/hill_official.py WORK --seed S [--official PATH] [--threads 2]

WORK is prepared by hill_reference.py: budget.json (the budget), images.npy (uint8 [N, H, W, C]),
labels.npy, clf.pth (a WideResNet state dict, random or trained, meliketoy keys as nets.py) and
ebm.pth (an EBM state dict, keys f.0 … f.8 as nets.py). Prints one JSON line: the side, its
chain rows (Langevin chains run, each of K steps) and its record (images still defended before
the attack and after each of the iterates 0 … steps: the script's `class_path` sums).

--official PATH runs PATH/bpda_eot_attack.py unchanged (runpy) from WORK/official-S, a folder
laid out as the script expects (it reads ./config_attack/bpda_eot_attack.json and copies
./bpda_eot_attack.py, ./nets.py, ./utils.py: symlinks to PATH). Adapted at run time, nothing else:
- `.cuda()` on modules and tensors is the identity and `torch.load` maps to the CPU (the script
  hard-codes CUDA);
- `utils.import_data` returns our images with the script's own transform (ToTensor then
  Normalize(0.5, 0.5): 2x − 1) instead of downloading CIFAR-10; where torchvision is not
  installed (it is used by import_data only) an empty stand-in module is imported instead;
- `nets.WideResNet`'s default depth / widen are the budget's (the script builds the default, WRN-28-10);
- `nets.EBM.forward` counts its rows (rows ÷ K = chain rows).

The re-statement (no --official) is our own code of the same protocol: images on [−1, 1];
a baseline check, then at each of the iterates 0 … steps one EOT forward over `eot` draws
(draw-major repeat, logits averaged, cross-entropy of the mean; at every iterate a backward for
the BPDA gradient, averaged over draws) that nominates candidates — images the draw misclassifies
and not yet broken — each re-checked alone with H chains (logits averaged); once broken stays
broken; ℓ∞ sign step, projection, clamp to [−1, 1]; random start.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def images_pm1(work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images on [−1, 1], NCHW float; labels): the script's ToTensor + Normalize(0.5, 0.5)."""
    x = torch.from_numpy(np.load(work / "images.npy")).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5, torch.from_numpy(np.load(work / "labels.npy")).long()


def script_config(b: dict, seed: int, work: Path) -> dict:
    """config_attack/bpda_eot_attack.json for the budget (ε and η in [0, 255] units, as the script's)."""
    return {"data_type": "cifar10", "exp_dir": "out_attack/eot_bpda", "batch_size": b["images"],
            "start_batch": 1, "end_batch": 1, "subset_shuffle": False, "seed": seed,
            "clf_weight_path": str(work / "clf.pth"), "ebm_weight_path": str(work / "ebm.pth"),
            "adv_norm": "l_inf", "adv_steps": b["attack_steps"], "adv_eps": b["eps_255"],
            "adv_eta": b["step_255"], "adv_rand_start": True, "use_bpda_eot": True,
            "eot_attack_reps": b["eot"], "eot_attack_ave": "logits", "langevin_steps": b["langevin_steps"],
            "langevin_eps": b["langevin_eps"], "eot_defense_reps": b["chains"], "eot_defense_ave": "logits",
            "log_freq": 5}


def _patch_torch_for_cpu() -> None:
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    load = torch.load
    torch.load = lambda f, *a, **k: load(f, map_location="cpu", weights_only=True)


def _stub_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.datasets = types.ModuleType("torchvision.datasets")
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms,
                            "torchvision.datasets": tv.datasets})


def run_official(path: Path, work: Path, b: dict, seed: int) -> dict:
    """Run the fetched bpda_eot_attack.py on our nets and images; (chain rows, record)."""
    run_dir = work / f"official-{seed}"
    (run_dir / "config_attack").mkdir(parents=True, exist_ok=True)
    (run_dir / "config_attack" / "bpda_eot_attack.json").write_text(json.dumps(script_config(b, seed, work)))
    for name in ("bpda_eot_attack.py", "nets.py", "utils.py"):
        link = run_dir / name
        if not link.exists():
            link.symlink_to((path / name).resolve())
    os.chdir(run_dir)
    sys.path.insert(0, str(run_dir))
    os.environ.setdefault("MPLBACKEND", "Agg")
    _patch_torch_for_cpu()
    _stub_torchvision()
    import nets
    import utils
    x, y = images_pm1(work)
    utils.import_data = lambda *a, **k: (torch.utils.data.TensorDataset(x, y), 10)
    # the script calls WideResNet(num_classes=…) and nets.py calls super(WideResNet, self): set defaults
    nets.WideResNet.__init__.__defaults__ = (b["depth"], b["widen"], 10, 0.0)
    rows: dict[str, int] = {}
    forward = nets.EBM.forward

    def counted(self, X):
        part = _script_part(sys._getframe(1))
        rows[part] = rows.get(part, 0) + X.shape[0]
        return forward(self, X)

    nets.EBM.forward = counted
    runpy.run_path(str(run_dir / "bpda_eot_attack.py"), run_name="__main__")
    results = sorted(run_dir.glob("out_attack/*/log/results.pth"))[-1]
    class_path = torch.load(results)["class_path"]
    parts = {k: v // b["langevin_steps"] for k, v in rows.items()}
    return {"chain_rows": sum(parts.values()), "parts": parts,
            "record": [int(v) for v in class_path.sum(1)], "verdicts": [bool(v) for v in class_path[-1]]}


def _script_part(frame) -> str:
    """Which part of the script an EBM call belongs to: its baseline check of the clean images
    (step −1: the EOT forward and the re-check of its candidates) as "clean", the EOT forwards
    of iterates 0 … steps as "attack", their candidates' re-checks as "re-checks"."""
    step, verifying = None, False
    while frame is not None:
        name = frame.f_code.co_name
        verifying |= name == "eot_defense_verification"
        if name == "eval_and_attack_grad":
            step = frame.f_locals.get("step")
            break
        frame = frame.f_back
    if step == -1:
        return "clean"
    return "re-checks" if verifying else "attack"


class Restated:
    """The protocol as the script runs it, in our own words (see the module docstring)."""

    def __init__(self, clf: torch.nn.Module, ebm: torch.nn.Module, b: dict):
        self.clf, self.ebm, self.b = clf, ebm, b
        self.rows: dict[str, int] = {}
        self.part = "clean"   # the baseline check; "attack" from iterate 0

    def purify(self, X: torch.Tensor, recheck: bool = False) -> torch.Tensor:
        part = "re-checks" if recheck and self.part == "attack" else self.part
        self.rows[part] = self.rows.get(part, 0) + X.shape[0]
        X = X.detach()
        for _ in range(self.b["langevin_steps"]):
            X.requires_grad_(True)
            with torch.enable_grad():
                grad = torch.autograd.grad(self.ebm(X).sum(), X)[0]
            X = X.detach() - grad + self.b["langevin_eps"] * torch.randn_like(X)
        return X

    def mean_logits(self, X: torch.Tensor, draws: int, grad: bool,
                    recheck: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits averaged over `draws` chains per image [B, K], BPDA gradient [B, ...] or None)."""
        purified = self.purify(X.repeat(draws, 1, 1, 1), recheck).requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            logits = self.clf(purified).view(draws, X.shape[0], -1).mean(0)
        if not grad:
            return logits, None
        g = torch.autograd.grad(F.cross_entropy(logits, self.y), purified)[0]
        return logits.detach(), g.view(draws, *X.shape).mean(0)

    def check(self, X: torch.Tensor, defended: torch.Tensor, grad: bool) -> torch.Tensor | None:
        """Candidates from one EOT forward, each re-checked with H chains; the BPDA gradient."""
        logits, g = self.mean_logits(X, self.b["eot"], grad)
        for i in ((logits.argmax(1) != self.y) & defended).nonzero().flatten().tolist():
            with torch.no_grad():
                verdict = self.mean_logits(X[i:i + 1], self.b["chains"], False, recheck=True)[0].argmax(1)
            defended[i] = bool(verdict == self.y[i])
        return g

    def attack(self, X: torch.Tensor, y: torch.Tensor) -> list[int]:
        self.y = y
        eps, eta = self.b["eps_255"] * 2 / 255, self.b["step_255"] * 2 / 255
        defended = torch.ones(len(y), dtype=torch.bool)
        self.check(X, defended, grad=False)
        record = [int(defended.sum())]
        X_adv = (X + eps * (2 * torch.rand_like(X) - 1)).clamp(-1, 1)
        self.part = "attack"
        for step in range(self.b["attack_steps"] + 1):
            g = self.check(X_adv, defended, grad=True)
            record.append(int(defended.sum()))
            if step < self.b["attack_steps"]:
                X_adv = torch.min(torch.max(X_adv + eta * g.sign(), X - eps), X + eps).clamp(-1, 1)
        self.verdicts = [bool(v) for v in defended]
        return record


def run_restated(work: Path, b: dict, seed: int) -> dict:
    from pipeline.classifiers.wideresnet import WideResNetMeliketoy
    from pipeline.purifiers.nets.ebm_nets import EBM

    torch.manual_seed(seed)
    clf = WideResNetMeliketoy(b["depth"], b["widen"], 10)
    clf.load_state_dict(torch.load(work / "clf.pth", weights_only=True))
    ebm = EBM(n_c=3, n_f=32, leak=0.05, image_size=32)
    ebm.load_state_dict(torch.load(work / "ebm.pth", weights_only=True))
    for net in (clf, ebm):
        net.eval().requires_grad_(False)
    side = Restated(clf, ebm, b)
    x, y = images_pm1(work)
    record = side.attack(x, y)
    return {"chain_rows": sum(side.rows.values()), "parts": side.rows, "record": record, "verdicts": side.verdicts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--official", type=Path, default=None, help="folder holding bpda_eot_attack.py")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = a.work.resolve()
    b = json.loads((work / "budget.json").read_text())
    if a.official is not None:
        out = {"side": "official", **run_official(a.official, work, b, a.seed)}
    else:
        sys.path.insert(0, str(ROOT))
        out = {"side": "restated", **run_restated(work, b, a.seed)}
    print("HILL_RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
