"""`advpure plan` against a measured `advpure run`, on shipped configs with small budgets.

    python benchmarks/plan_accuracy.py [--only demo_digits mnist_undefended_sweep adp_mnist_cpu]
                                       [--models DIR] [--workdir DIR]

For each config (the shipped YAML, with `--set` overrides that point it at local models and
shards and shrink its budgets — printed with the results), runs `advpure plan --json` and
then `advpure run` in fresh processes, and compares:
- model evaluations: the plan's total against Σ `nfe` of the run's commit markers;
- compute time: the plan's one-worker time less start-up against Σ marker `seconds`
  (each shard's time inside its worker, read → commit);
- wall time: the plan's one-worker time (with `--ray-startup`: a measured local Ray start)
  against the stage's wall seconds in the manifest (Ray start, actor start, compute, commits).

Models: `--models DIR` must hold cnn.pt and dae.pt (digits, small_cnn / dae), mnist_cnn.pt
(small_cnn on MNIST) and mnist_score.pt (ADP score network); shards are made here
(digits) or taken from --mnist-shards.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADVPURE = [sys.executable, "-m", "pipeline.cli"]


def _cases(models: Path, work: Path, mnist_dir: Path) -> dict[str, tuple[str, list[str]]]:
    digits = work / "shards-digits" / "shard-{000000..000003}.tar"
    mnist = mnist_dir / "shard-{000000..000003}.tar"
    return {
        "demo_digits": ("configs/demo_digits.yaml", [
            f"data.shards={digits}", f"classifier.params.checkpoint={models / 'cnn.pt'}",
            f"purifier.params.checkpoint={models / 'dae.pt'}", "attacks.1.params.steps=20",
            "attacks.2.params.n_queries=200", "cluster.num_workers=1"]),
        "mnist_undefended_sweep": ("configs/mnist_undefended_sweep.yaml", [
            f"data.shards={mnist}", f"classifier.params.checkpoint={models / 'mnist_cnn.pt'}",
            "data.max_samples_per_shard=100", "cluster.num_workers=1"]),
        "adp_mnist_cpu": ("configs/adp_mnist_cpu.yaml", [
            f"data.shards={mnist_dir / 'shard-{000000..000001}.tar'}",
            f"classifier.params.checkpoint={models / 'mnist_cnn.pt'}",
            f"purifier.params.checkpoint={models / 'mnist_score.pt'}", "data.max_samples_per_shard=5",
            "evaluation.runs=2", "evaluation.eot_probe=2", "attacks.0.params.steps=5", "attacks.1.params.steps=3",
            "attacks.1.eot=2", "attacks.2.params.steps=3", "attacks.2.eot=1", "attacks.3.params.n_queries=20",
            "attacks.3.eot=1", "cluster.num_workers=1"]),
    }


def _advpure(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(ADVPURE + args, cwd=ROOT, env=env, capture_output=True, text=True)


def _markers(output: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((output / stage).glob("*.done.json"))]


def run_case(name: str, config: str, sets: list[str], work: Path) -> dict:
    out = work / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)
    sets = sets + [f"job.output={out}"]
    flags = [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    planned = _advpure(["plan", config, "--json", "--ray-startup", *flags])
    plan_s = time.perf_counter() - t0
    if planned.returncode != 0:
        raise SystemExit(f"{name}: plan failed\n{planned.stderr[-3000:]}")
    plan = json.loads(planned.stdout[planned.stdout.index("{"):])
    t0 = time.perf_counter()
    ran = _advpure(["run", config, *flags])
    run_s = time.perf_counter() - t0
    if ran.returncode != 0:
        raise SystemExit(f"{name}: run failed\n{ran.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    stage = next(iter(manifest["stages"]))
    markers = _markers(out, stage)
    workers = next(w for w in plan["per_workers"] if w["workers"] == 1)
    return {"name": name, "config": config, "sets": sets, "plan_seconds": plan_s, "run_seconds": run_s,
            "nfe_pred": plan["evaluations"], "nfe_run": sum(int(m.get("nfe", 0)) for m in markers),
            "compute_pred": plan["seconds_one_worker"] - plan["startup_seconds"],
            "compute_run": sum(float(m["seconds"]) for m in markers),
            "wall_pred": workers["seconds"], "wall_run": float(manifest["stages"][stage]["seconds"]),
            "load": os.getloadavg()[0]}


def _err(pred: float, meas: float) -> str:
    return f"{100.0 * (pred - meas) / meas:+6.1f}%" if meas else "—"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=None)
    ap.add_argument("--models", default=str(ROOT / "runs/models"))
    ap.add_argument("--workdir", default="/tmp/advpure-plan-accuracy")
    ap.add_argument("--mnist-shards", default=str(ROOT / "runs/shards/mnist-holdout"),
                    help="folder of the 4 MNIST hold-out shards (advpure make-shards mnist ... --split t10k-holdout)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    if not (work / "shards-digits" / "index.json").exists():
        from pipeline.io.make_shards import make_shards

        make_shards("digits", str(work / "shards-digits"), split="test", samples_per_shard=90)
    cases = _cases(Path(args.models), work, Path(args.mnist_shards))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; 1 worker, 1 thread per worker")
    print(f"{'config':24s} {'evals pred/run':>22s} {'err':>7s} {'compute pred/run s':>20s} {'err':>7s} "
          f"{'wall pred/run s':>17s} {'err':>7s}")
    for name in args.only or list(cases):
        config, sets = cases[name]
        r = run_case(name, config, sets, work)
        print(f"{name:24s} {r['nfe_pred']:>10,.0f}/{r['nfe_run']:<11,d} {_err(r['nfe_pred'], r['nfe_run'])} "
              f"{r['compute_pred']:>9.1f}/{r['compute_run']:<10.1f} {_err(r['compute_pred'], r['compute_run'])} "
              f"{r['wall_pred']:>8.1f}/{r['wall_run']:<8.1f} {_err(r['wall_pred'], r['wall_run'])}", flush=True)
        print(f"    overrides: {' '.join(r['sets'][:-1])}; load {r['load']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
