"""`autoattack_rand` against AutoAttack's own `version='rand'`, whole processes, paired (issue 23).

    python benchmarks/autoattack_official.py --autoattack DIR [--samples 50] [--steps 20] [--eot 20]
        [--eps 0.1] [--sigma 0.15] [--threads 1] [--pairs 3] [--max-rows auto] [--classifier CKPT]
        [--workdir DIR] [--unchunked | --steps-broken] [--cascade auto|true|false]
        [--channels-last auto|true|false] [--contiguous]

DIR holds the official code's `autoattack` package (fra31/auto-attack, e.g. extracted from a
fetched mirror into /tmp); it is imported from there at run time, never copied into this repo.

The same model, images and budget on both sides: the small CNN (trained first if missing,
jobs/train_classifier.py's recipe: held-out MNIST `t10k-fit` when the MNIST test files are
there, else the digits train split) behind the `gaussian` purifier (σ, stochastic), the first
--samples images of `t10k-holdout` (or digits test) in one shard, ℓ∞ ε, APGD-CE then APGD-DLR with
--steps iterations and EOT --eot, one restart.
- A (advpure): `advpure run JOB` with default settings (evaluation.max_rows auto, runs 1,
  cascade auto — on for this preset —, the clean gate, the local executor), the
  `autoattack_rand` preset with eps/steps/eot overridden, batch = all samples; its robust
  accuracy from the committed records (per-sample worst case).
- B (AutoAttack): a process that imports the official package, wraps the defended forward —
  classifier(clip(x + σ·z)), z fresh from torch.randn on every call, as AutoAttack expects of
  a randomized model — and runs `AutoAttack(model, 'Linf', eps, version='rand')` with
  apgd.n_iter = --steps and eot_iter = --eot over all samples in one batch.
Both processes get --threads torch threads (OMP/MKL too). Runs alternate A B A B … (the
machine is shared: pairs let the load fall on both sides); each pair's ratio A/B and the
median are printed with both robust accuracies and what `max_rows: auto` picked (commit marker),
and the ratio of CPU seconds (user + system of each process: what the machine's other load
adds to least).
--unchunked adds a third run to every pair: advpure with EOT gradient steps in one forward and
one backward per batch (pipeline.attacks.base.SAMPLE_CHUNKS off, as before sample chunks), for
a same-load comparison. --steps-broken does the same with APGD stepping every sample of a run to
its end (pipeline.attacks.apgd.SKIP_BROKEN off: the path before APGD skipped confirmed breaks).
--contiguous does the same with evaluation.channels_last false (the networks contiguous, as
before the memory format was measured); --channels-last pins that setting for every advpure run.
--cascade true|false pins advpure's `evaluation.cascade` (default: auto, which for this preset
is true — APGD-DLR on APGD-CE's survivors only, as AutoAttack runs its attacks; false runs
APGD-DLR on every sample, advpure's default before `cascade: auto`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(a: argparse.Namespace, work: Path) -> tuple[str, str, str]:
    """(dataset label, the shard, classifier checkpoint), training the CNN if missing."""
    from pipeline.io import datasets
    from pipeline.io import shards as shard_io
    from pipeline.io.make_shards import make_shards
    from pipeline.train import recipes

    mnist = datasets.mnist_available()
    source, split, fit = ("mnist", "t10k-holdout", "t10k-fit") if mnist else ("digits", "test", "train")
    ckpt = a.classifier or str(ROOT / "runs/models" / f"{source}_cnn.pt")
    if not Path(ckpt).exists():
        Path(ckpt).parent.mkdir(parents=True, exist_ok=True)
        meta = recipes.train_small_cnn(ckpt, source, fit, epochs=3 if mnist else 40, seed=0)
        print(f"trained {ckpt}: train accuracy {meta['train_accuracy']:.4f}, {meta['seconds']:.0f} s", flush=True)
    doc = make_shards(source, str(work / "shards"), split=split, samples_per_shard=a.samples, limit=a.samples)
    return f"{source} {split}", shard_io.expand(doc["pattern"])[0], ckpt


def job(a: argparse.Namespace, shard: str, ckpt: str, out: Path) -> dict:
    ev = {} if a.max_rows == "auto" else {"max_rows": int(a.max_rows)}   # default: auto
    return {"job": {"name": "autoattack_official", "output": str(out), "seed": 0},
            "data": {"shards": shard, "batch_size": a.samples},
            "classifier": {"name": "small_cnn", "params": {"checkpoint": ckpt}},
            "purifier": {"name": "gaussian", "params": {"sigma": a.sigma}},
            "attacks": [{"preset": "autoattack_rand", "overrides": {"eps": a.eps, "steps": a.steps, "eot": a.eot}}],
            "evaluation": {"device": "cpu", **ev, **({} if a.cascade == "auto" else {"cascade": a.cascade == "true"}),
                           **({} if a.channels_last == "auto" else {"channels_last": a.channels_last == "true"})},
            "cluster": {"num_workers": 1, "cpus_per_worker": a.threads}}


# `advpure run` with a module flag switched off — EOT gradient steps in one call per batch
# (pipeline.attacks.base.SAMPLE_CHUNKS) or APGD stepping broken samples (pipeline.attacks.apgd.SKIP_BROKEN):
# the local executor runs the worker in this process, so the flag reaches it
FLAG_OFF = ("import sys; import {module} as m; m.{flag} = False; "
            "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
VARIANTS = {"unchunked": ("pipeline.attacks.base", "SAMPLE_CHUNKS"),
            "steps-broken": ("pipeline.attacks.apgd", "SKIP_BROKEN")}


def variant(a: argparse.Namespace) -> str | None:
    """The third run of each pair (--unchunked, --steps-broken or --contiguous), if any."""
    return ("unchunked" if a.unchunked else "steps-broken" if a.steps_broken
            else "contiguous" if a.contiguous else None)


def contiguous_job(job_file: Path) -> Path:
    """The --contiguous run's job: the same with evaluation.channels_last false."""
    return job_file.with_name("job-contiguous.json")


def run_ours(a: argparse.Namespace, job_file: Path, out: Path, env: dict, flag_off: str | None = None
             ) -> tuple[float, dict]:
    """Wall seconds of `advpure run`, and (robust accuracy, max_rows record) from its output."""
    from pipeline.run import commit

    shutil.rmtree(out, ignore_errors=True)
    cmd = (["-m", "pipeline.cli"] if flag_off is None
           else ["-c", FLAG_OFF.format(module=VARIANTS[flag_off][0], flag=VARIANTS[flag_off][1])])
    proc, wall, cpu = timed([sys.executable, *cmd, "run", str(job_file)], env)
    (out.parent / "advpure_run.log").write_text(proc.stdout + proc.stderr)   # the last run's log
    if proc.returncode != 0:
        raise SystemExit(f"advpure run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = commit.load_records(str(out)).to_pylist()
    robust: dict[str, bool] = {}
    for r in rows:   # per-sample worst case over the two entries
        robust[r["key"]] = robust.get(r["key"], True) and bool(r["robust"])
    marker = next(iter(commit.committed(str(out), "evaluate").values()))
    return wall, {"robust": sum(robust.values()) / len(robust), "max_rows": marker.get("max_rows"), "cpu": cpu}


def run_autoattack(a: argparse.Namespace, shard: str, ckpt: str, env: dict) -> tuple[float, dict]:
    args = [sys.executable, __file__, "--side", "autoattack", "--autoattack", a.autoattack, "--shard", shard,
            "--classifier", ckpt, "--samples", str(a.samples), "--steps", str(a.steps), "--eot", str(a.eot),
            "--eps", str(a.eps), "--sigma", str(a.sigma), "--threads", str(a.threads)]
    proc, wall, cpu = timed(args, env)
    if proc.returncode != 0:
        raise SystemExit(f"AutoAttack run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, {**json.loads(proc.stdout.strip().splitlines()[-1]), "cpu": cpu}


def timed(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """(the finished process, its wall seconds, its CPU seconds: user + system of the child,
    which the machine's other load does not add to)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def autoattack_side(a: argparse.Namespace) -> int:
    """B: the official AutoAttack 'rand' on the defended model (this process is timed whole)."""
    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, a.autoattack)
    from autoattack import AutoAttack

    from pipeline.io import shards as shard_io
    from pipeline.registry import CLASSIFIERS

    clf = CLASSIFIERS.build("small_cnn", checkpoint=a.classifier).eval().requires_grad_(False)
    sigma = a.sigma

    class Defended(torch.nn.Module):   # the gaussian purifier's math with fresh torch noise per call
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return clf((x + sigma * torch.randn_like(x)).clamp(0.0, 1.0))

    samples = [s for s in shard_io.read_shard(a.shard) if s.error is None][: a.samples]
    x = torch.from_numpy(__import__("numpy").stack([shard_io.to_unit_float(s.image) for s in samples]))
    x, y = x.permute(0, 3, 1, 2).contiguous(), torch.tensor([s.label for s in samples])
    torch.manual_seed(0)
    adversary = AutoAttack(Defended().eval(), norm="Linf", eps=a.eps, version="rand", device="cpu", verbose=False,
                           seed=0)
    adversary.apgd.n_iter = a.steps
    adversary.apgd.eot_iter = a.eot
    with open(os.devnull, "w") as null:   # AutoAttack prints its own progress and warnings
        stdout, sys.stdout = sys.stdout, null
        try:
            x_adv = adversary.run_standard_evaluation(x, y, bs=len(samples))
            with torch.no_grad():
                robust = (Defended()(x_adv).argmax(1) == y).float().mean().item()
        finally:
            sys.stdout = stdout
    print(json.dumps({"robust": robust}))
    return 0


def pairs(a: argparse.Namespace, job_file: Path, out: Path, shard: str, ckpt: str, env: dict) -> dict:
    """Runs the pairs (or triples, with --unchunked / --steps-broken), printing a table row each
    and the medians of the wall and CPU ratios; returns the last run's max_rows record."""
    third = variant(a)
    off = f" {third} s (CPU) | wall ratio | CPU ratio | robust {third} |" if third else ""
    rule = "|---" * (9 + (4 if off else 0)) + "|"
    print(f"| pair | advpure s (CPU) | AutoAttack s (CPU) | wall ratio | CPU ratio | robust advpure | "
          f"robust AutoAttack |{off} max_rows (auto) | load |\n{rule}", flush=True)
    ratios: dict[str, list[float]] = {"wall": [], "cpu": [], f"wall {third}": [], f"cpu {third}": []}
    for i in range(a.pairs):
        sides = ("ours", "aa", "off") if third else ("ours", "aa")
        runs = {}
        for side in (sides if i % 2 == 0 else sides[::-1]):   # alternate which side starts a pair
            if side == "aa":
                runs[side] = run_autoattack(a, shard, ckpt, env)
            elif side == "off" and third == "contiguous":
                runs[side] = run_ours(a, contiguous_job(job_file), out, env)
            else:
                runs[side] = run_ours(a, job_file, out, env, flag_off=third if side == "off" else None)
        (wa, ra) = runs["aa"]
        cells = []
        for side, tag in (("ours", ""), ("off", f" {third}")):
            if side in runs:
                w, r = runs[side]
                ratios["wall" + tag].append(w / wa)
                ratios["cpu" + tag].append(r["cpu"] / ra["cpu"])
                cells.append(f"{w:.1f} ({r['cpu']:.1f}) | {w / wa:.2f} | {r['cpu'] / ra['cpu']:.2f} | "
                             f"{100 * r['robust']:.1f} %")
        ours = cells[0].split(" | ")
        mr = runs["ours"][1]["max_rows"] or {}
        row = [str(i + 1), ours[0], f"{wa:.1f} ({ra['cpu']:.1f})", *ours[1:3], ours[3], f"{100 * ra['robust']:.1f} %",
               *cells[1:], f"{mr.get('rows')} ({mr.get('how')})", f"{os.getloadavg()[0]:.1f}"]
        print("| " + " | ".join(row) + " |", flush=True)
    for k, v in ratios.items():   # "wall", "cpu", and with a third run "wall <variant>", "cpu <variant>"
        if v:
            what, _, tag = k.partition(" ")
            print(f"median advpure{' ' + tag if tag else ''} / AutoAttack, {what}: {statistics.median(v):.2f} "
                  f"(pairs: {', '.join(f'{r:.2f}' for r in v)})")
    return mr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--autoattack", required=True, help="folder holding the official `autoattack` package")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eot", type=int, default=20)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--sigma", type=float, default=0.15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--max-rows", default="auto", help="advpure's evaluation.max_rows (default: auto, the default)")
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--unchunked", action="store_true",
                    help="each pair also runs advpure with EOT gradients in one call per batch (SAMPLE_CHUNKS off)")
    ap.add_argument("--steps-broken", action="store_true",
                    help="each pair also runs advpure with APGD stepping broken samples (apgd.SKIP_BROKEN off)")
    ap.add_argument("--contiguous", action="store_true",
                    help="each pair also runs advpure with evaluation.channels_last false")
    ap.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto",
                    help="advpure's evaluation.channels_last (default auto: measured per worker, the default)")
    ap.add_argument("--cascade", choices=("auto", "true", "false"), default="auto",
                    help="advpure's evaluation.cascade (default auto, advpure's default: on for this preset, "
                         "APGD-DLR on APGD-CE's survivors as AutoAttack; false: APGD-DLR on every sample)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--side", choices=["autoattack"], help=argparse.SUPPRESS)
    ap.add_argument("--shard", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side == "autoattack":
        return autoattack_side(a)
    if a.unchunked + a.steps_broken + a.contiguous > 1:
        print("--unchunked, --steps-broken and --contiguous each add the third run of a pair: give one",
              file=sys.stderr)
        return 2
    if not (Path(a.autoattack) / "autoattack" / "autoattack.py").exists():
        print(f"--autoattack {a.autoattack}: no autoattack/autoattack.py there", file=sys.stderr)
        return 2
    work = Path(a.workdir or tempfile.mkdtemp(prefix="aa_official_"))
    label, shard, ckpt = prepare(a, work)
    job_file, out = work / "job.json", work / "out"
    job_file.write_text(json.dumps(job(a, shard, ckpt, out)))
    if a.contiguous:
        doc = job(a, shard, ckpt, out)
        doc["evaluation"]["channels_last"] = False
        contiguous_job(job_file).write_text(json.dumps(doc))
    threads = str(a.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"{label}: {a.samples} images, small CNN behind gaussian σ={a.sigma:g}; APGD-CE + APGD-DLR, "
          f"{a.steps} steps, EOT {a.eot}, ℓ∞ ε={a.eps:g}; {a.threads} thread(s); max_rows {a.max_rows}; "
          f"advpure cascade {a.cascade}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    mr = pairs(a, job_file, out, shard, ckpt, env)
    if mr and mr.get("how") != "configured":
        print(f"max_rows: {mr.get('rows')} — {mr.get('detail')} ({mr.get('workload')}, settled in "
              f"{mr.get('seconds')} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
