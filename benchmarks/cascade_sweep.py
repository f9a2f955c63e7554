"""Cascade on against off over an ε sweep (issue 22's evidence).

    python benchmarks/cascade_sweep.py [--samples 50] [--eps 0.05 0.1 0.2 0.3] [--steps 10]
        [--queries 100] [--eot 2] [--runs 3] [--sigma 0.15] [--threads 1]
        [--old-chain] [--classifier runs/models/mnist_cnn.pt] [--workdir DIR]

A preset expanded over several ε, evaluated once with `evaluation.cascade: true` and once
without, on the held-out MNIST images (`t10k-holdout`) when the MNIST test files are there,
else on the embedded digits:
- undefended: the small CNN (purifier `none`) under `autoattack_standard` (APGD-CE, APGD-T,
  Square);
- stochastic: the same CNN behind the `gaussian` purifier (keyed noise, R runs) under
  `autoattack_rand` (APGD-CE, APGD-DLR with EOT).
The classifier checkpoint is trained first if missing (jobs/train_classifier.py's recipe on
`t10k-fit`, or on the digits train split). Each evaluation is one shard through the
evaluation worker (`ShardWorker.process`, as a Ray actor runs it, no Ray) and the report
(`pipeline.report.summarize`) of its committed records. Prints per defense and ε the
headline (per-sample worst case, with its 95 % interval) on and off, the (sample, ε) verdicts
that differ, the model evaluations per sample on and off, and the record checks that fail
(`eps_monotone`, `cascade_chain`, …). Exits 1 if a verdict differs or the headline rises
with ε. --old-chain adds a column: the cascade as it was before issue 22 (the whole expanded
list one chain), to show what it reported.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline import config, report  # noqa: E402
from pipeline.evaluation import stages  # noqa: E402
from pipeline.io import datasets  # noqa: E402
from pipeline.io import shards as shard_io  # noqa: E402
from pipeline.io.make_shards import make_shards  # noqa: E402
from pipeline.run import commit  # noqa: E402
from pipeline.run.worker import ShardWorker  # noqa: E402
from pipeline.train import recipes  # noqa: E402


def prepare(a: argparse.Namespace, work: Path) -> tuple[str, str, str]:
    """(dataset label, the shard, classifier checkpoint), training the CNN if missing."""
    mnist = datasets.mnist_available()
    source, split, fit = ("mnist", "t10k-holdout", "t10k-fit") if mnist else ("digits", "test", "train")
    ckpt = a.classifier or str(ROOT / "runs/models" / f"{source}_cnn.pt")
    if not Path(ckpt).exists():
        Path(ckpt).parent.mkdir(parents=True, exist_ok=True)
        meta = recipes.train_small_cnn(ckpt, source, fit, epochs=3 if mnist else 40, seed=0)
        print(f"trained {ckpt}: train accuracy {meta['train_accuracy']:.4f}, {meta['seconds']:.0f} s")
    doc = make_shards(source, str(work / "shards"), split=split, samples_per_shard=a.samples, limit=a.samples)
    return f"{source} {split}", shard_io.expand(doc["pattern"])[0], ckpt


def defenses(a: argparse.Namespace) -> dict[str, dict]:
    """The config sections that differ per defense: purifier, attacks, evaluation runs."""
    eps = list(a.eps)
    standard = {"eps": eps, "steps": a.steps, "n_queries": a.queries}
    return {
        "undefended": {"purifier": {"name": "none"}, "runs": 1,
                       "attacks": [{"preset": "autoattack_standard", "overrides": standard}]},
        f"gaussian σ={a.sigma:g}": {"purifier": {"name": "gaussian", "params": {"sigma": a.sigma}}, "runs": a.runs,
                                    "attacks": [{"preset": "autoattack_rand",
                                                 "overrides": {"eps": eps, "steps": a.steps, "eot": a.eot}}]},
    }


def evaluate(shard: str, ckpt: str, d: dict, cascade: bool | str, out: Path, batch: int) -> tuple[dict, list, float]:
    """One shard through the worker; the report and the committed rows, and its seconds.
    cascade "old": the pre-issue-22 cascade, one chain over the whole expanded list."""
    if cascade == "old":
        groups = stages.cascade_groups
        stages.cascade_groups = lambda attacks: [list(attacks)]
        try:
            return evaluate(shard, ckpt, d, True, out, batch)
        finally:
            stages.cascade_groups = groups
    cfg = config.from_dict({
        "job": {"name": "cascade_sweep", "output": str(out), "seed": 0},
        "data": {"shards": shard, "batch_size": batch},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": ckpt}},
        "purifier": d["purifier"], "attacks": d["attacks"],
        "evaluation": {"runs": d["runs"], "cascade": cascade, "device": "cpu"}})
    t0 = time.perf_counter()
    ShardWorker(cfg.to_dict()).process(shard, "s")
    seconds = time.perf_counter() - t0
    table = commit.read_marked(str(out), "evaluate", "s", commit.committed(str(out), "evaluate")["s"])
    return report.summarize(table), table.to_pylist(), seconds


def verdicts(rows: list[dict]) -> dict[tuple, bool]:
    """Per (sample, norm, ε): robust under every attack entry of that threat model."""
    out: dict[tuple, bool] = {}
    for r in rows:
        k = (r["key"], r["norm"], r["eps"])
        out[k] = out.get(k, True) and bool(r["robust"])
    return out


LABEL = {False: "off", True: "on", "old": "old chain"}


def _cell(w: dict) -> str:
    return f"{100 * w['acc']:.1f} % [{100 * w['lo']:.1f}, {100 * w['hi']:.1f}]"


def compare(name: str, runs: dict[bool | str, tuple[dict, list, float]]) -> bool:
    """Print one defense's table; True if cascade on and off agree on every verdict and
    neither headline rises with ε (the old chain, when run, is shown, not judged)."""
    worst = {c: {w["eps"]: w for w in runs[c][0]["worst_case"]} for c in runs}
    v = {c: verdicts(runs[c][1]) for c in runs}
    cost = {c: runs[c][0]["cost"]["model_evaluations_per_sample"] for c in runs}
    print(f"\n{name}: {runs[False][0]['cost']['samples']} samples; model evaluations per sample "
          + ", ".join(f"{LABEL[c]} {cost[c]:.0f}" for c in runs) + f" (on/off {cost[True] / cost[False]:.2f}); "
          + "seconds " + ", ".join(f"{LABEL[c]} {runs[c][2]:.0f}" for c in runs))
    print("| ε | " + " | ".join(f"robust {LABEL[c]} [95 % CI]" for c in runs)
          + " | " + " | ".join(f"verdicts {LABEL[c]} ≠ off" for c in runs if c is not False) + " |")
    print("|---" * (1 + 2 * len(runs) - 1) + "|")
    for eps in sorted(worst[False]):
        keys = [k for k in v[False] if k[2] == eps]
        differ = [f"{sum(v[False][k] != v[c][k] for k in keys)} of {len(keys)}" for c in runs if c is not False]
        print(f"| {eps:g} | " + " | ".join(_cell(worst[c][eps]) for c in runs) + " | " + " | ".join(differ) + " |")
    ok = v[False] == v[True]
    for c in runs:
        failed = [f"{x['name']}" + (f" (attack {x['attack_index']})" if x.get("attack_index") is not None else "")
                  for x in runs[c][0]["checks"]["record"] if not x["passed"]]
        accs = [worst[c][e]["acc"] for e in sorted(worst[c])]
        ok &= c == "old" or all(b <= a for a, b in zip(accs, accs[1:]))
        print(f"cascade {LABEL[c]}: failed record checks: {', '.join(failed) or 'none'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--steps", type=int, default=10, help="APGD steps (the presets' 100 take too long here)")
    ap.add_argument("--queries", type=int, default=100, help="Square queries (the preset's 5,000 likewise)")
    ap.add_argument("--eot", type=int, default=2, help="EOT draws of autoattack_rand (its 20 likewise)")
    ap.add_argument("--runs", type=int, default=3, help="R evaluation runs of the stochastic defense")
    ap.add_argument("--sigma", type=float, default=0.15, help="gaussian purifier σ")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old-chain", action="store_true", help="also run the pre-issue-22 cascade (one chain)")
    ap.add_argument("--classifier", default=None, help="default runs/models/{mnist,digits}_cnn.pt")
    ap.add_argument("--workdir", default=None, help="default: a new temporary directory")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="advpure-cascade-sweep-"))
    data, shard, ckpt = prepare(a, work)
    print(f"{data}, {a.samples} samples, ε {a.eps}, APGD {a.steps} steps, "
          f"Square {a.queries} queries, {a.threads} thread(s); load average {os.getloadavg()[0]:.1f}")
    ok, modes = True, (False, True, "old") if a.old_chain else (False, True)
    for i, (name, d) in enumerate(defenses(a).items()):
        runs = {c: evaluate(shard, ckpt, d, c, work / f"out{i}-{LABEL[c].replace(' ', '-')}", a.samples) for c in modes}
        ok &= compare(name, runs)
    print("\nall verdicts agree, headline non-increasing in ε" if ok else "\nMISMATCH: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
