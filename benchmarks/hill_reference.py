"""The published Langevin protocol: `advpure run` against the official Hill et al. script.

    python benchmarks/hill_reference.py [--official PATH] [--restated] [--images 20]
        [--langevin-steps 20] [--attack-steps 5] [--eot 4] [--chains 16] [--runs R] [--eps-255 8]
        [--step-255 2] [--train-classifier EPOCHS] [--threads 2] [--workers 1]
        [--executor auto|local|ray] [--channels-last auto|true|false] [--check-samples N]
        [--verdicts runs [recheck]] [--pairs 2]
        [--seeds 0 1] [--work DIR]

Reference side: with --official PATH (a copy of point0bar1/ebm-defense, the folder holding
`bpda_eot_attack.py`), that script itself, run unchanged with the run-time adaptations listed in
benchmarks/hill_official.py (CUDA → CPU, our images instead of the CIFAR-10 download, the WRN
depth / widen, a row counter on the EBM); without it (or also, with --restated) our re-statement
of the same protocol in plain PyTorch (hill_official.py). Both re-check only candidates — images
the attack's own EOT draw misclassifies — with H chains each, as the script's
`eot_defense_verification` does.

advpure side: `advpure run` (python -m pipeline.cli run) of the `hill2021` preset at the same
budget in a fresh process — Ray start, actor start, shard decode, the clean R-run evaluation,
the attack with its re-checks, the final R-run evaluation, the gradient-masking checks and the
Parquet commits all included — `--workers` actors sharing `--threads` CPUs. `--verdicts runs
recheck` runs it twice in each pair: with R-run verdicts (the default) and with
`evaluation.verdict: recheck`, the script's own record (the clean verdict nominated by an EOT
forward and re-checked, robust = no confirmed break; no R-run evaluation at all).

Same inputs on every side: the first --images held-out digits (the digits `test` split) upscaled
to 32×32×3 (nearest, each 8×8 pixel a 4×4 block, grey to three channels) and written as uint8
(a shard for advpure, an array for the script, which maps them to [−1, 1] as its loader does);
a WideResNet (meliketoy layout, the script's nets.py, depth 10 / widen 2) and a randomly
initialised EBM (the script's lightweight EBM, n_f 32), both drawn from a fixed seed and saved
as state dicts that every side loads. The WRN is random unless --train-classifier EPOCHS trains
it first on the digits `train` split (every image not in `test`: disjoint from the benchmarked
ones), upscaled the same way and on [−1, 1], the range it sees on both sides: the script feeds
it the Langevin state on [−1, 1]; advpure maps the state back to [0, 1] pixels (unclipped) and
its `hill` preset normalises them by mean = std = 0.5. Random weights do not change the cost,
but a random classifier is wrong on most clean images, so nearly every image counts as broken
before the attack starts and the attack, the share of evaluation and the per-image verdicts
say little; a trained one (6 epochs: about 25 s on 2 idle cores, 98.6 % of the 360 `test` digits) makes
them mean something. The EBM stays random: with K Langevin steps it acts as a noise-like
purifier (a small, image-independent drift plus the Langevin noise), which keeps the protocol's
costs and stochastic verdicts without training one. The bare classifier's clean accuracy is
printed through both input paths (the script's nets.py on [−1, 1], advpure's builder on [0, 1])
before the runs, with the number of images on which the two predictions agree (all of them).

Whole processes are timed, interleaved in pairs (the order alternates) so machine load hits
both sides. Chain rows (Langevin chains of K steps) are counted on each side and per part:
the script's and the re-statement's EBM forward rows ÷ K — its baseline check of the clean
images (step −1: an EOT forward and the re-check of its candidates) as "clean", the EOT
forwards of iterates 0 … steps as "attack", their re-checks as "re-checks"; advpure's rows
through LangevinEBMPurifier.purify, counted by a sitecustomize hook on the run's PYTHONPATH
that appends one line per call with the part its caller names (gradient-masking checks, clean
R-run evaluation, attack, re-checks, final evaluation, and the timing of `max_rows: auto`'s
row-chunk calibration as "calibration"; Ray workers inherit it). Prints one
line per process and a table with each pair's ratio, the parts, advpure's evaluation share
(rows outside the attack and its re-checks) and how many per-image verdicts agree (the
script's defended-after-the-last-iterate against advpure's `robust`).
"""
from __future__ import annotations

import argparse
import importlib.util
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.classifiers.wideresnet import WideResNetMeliketoy  # noqa: E402
from pipeline.io import datasets  # noqa: E402
from pipeline.io.shards import ShardWriter  # noqa: E402
from pipeline.purifiers.nets.ebm_nets import EBM  # noqa: E402

NETS_SEED = 1234
ROW_HOOK = '''\
"""Benchmark-only: count the rows LangevinEBMPurifier.purify runs, one line per call."""
import importlib.abc, importlib.util, os, sys

_OUT = os.environ.get("HILL_BENCH_ROWS")
# the caller that names a call's part, innermost first (a re-check runs inside the attack)
_PARTS = (("settle", "calibration"), ("gradient_checks", "checks"), ("eot_probe", "checks"),
          ("recheck", "re-checks"), ("clean_eval", "clean"), ("final_evaluation", "final"),
          ("run_attack", "attack"))


def _part():
    names, f = set(), sys._getframe(2)
    while f is not None:
        names.add(f.f_code.co_name)
        f = f.f_back
    return next((part for fn, part in _PARTS if fn in names), "other")


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "pipeline.purifiers.langevin_ebm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            cls = module.LangevinEBMPurifier
            purify = cls.purify

            def counted(self, x, noise=None):
                with open(_OUT, "a") as f:
                    f.write(f"{x.shape[0]} {_part()}\\n")
                return purify(self, x, noise)

            cls.purify = counted

        spec.loader.exec_module = exec_module
        return spec


if _OUT:
    sys.meta_path.insert(0, _Hook())
'''


def upscale(images: np.ndarray) -> np.ndarray:
    """8×8 grey digits [N, 8, 8, 1] uint8 → [N, 32, 32, 3] (nearest: each pixel a 4×4 block)."""
    return np.repeat(np.repeat(images, 4, axis=1), 4, axis=2).repeat(3, axis=3)


def to_pm1(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC → NCHW on [−1, 1], as the script's ToTensor + Normalize(0.5, 0.5)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_classifier(work: Path, a: argparse.Namespace) -> Path:
    """A WRN trained on the digits `train` split (disjoint from the `test` images benchmarked),
    upscaled as they are and on [−1, 1] — what the net sees on both sides (the script feeds it
    the purified state on [−1, 1]; advpure's `hill` preset normalises [0, 1] pixels by 0.5 / 0.5).
    SGD (Nesterov momentum 0.9, lr 0.05 cosine-annealed, weight decay 5e-4), batches of 64,
    seeded; cached in WORK by (depth, widen, epochs, seed)."""
    cached = work / f"clf-wrn{a.depth}-{a.widen}-e{a.train_classifier}-s{NETS_SEED}.pth"
    if cached.exists():
        print(f"classifier: {cached.name} (cached)", flush=True)
        return cached
    images, labels, _ = datasets.load_split("digits", "train")
    x, y = to_pm1(upscale(images)), torch.from_numpy(labels).long()
    threads, t0 = torch.get_num_threads(), time.perf_counter()
    torch.set_num_threads(a.threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(NETS_SEED)
        net = WideResNetMeliketoy(a.depth, a.widen, 10).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.train_classifier)
        for _ in range(a.train_classifier):
            order = torch.randperm(len(x))
            for i in range(0, len(x) - 63, 64):   # full batches only: bn1's momentum 0.9 keeps the last
                batch = order[i:i + 64]
                loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    torch.set_num_threads(threads)
    torch.save(net.eval().state_dict(), cached)
    print(f"classifier: trained {a.train_classifier} epochs on {len(x)} digits (train split) in "
          f"{time.perf_counter() - t0:.1f} s, {a.threads} threads; last batch loss {loss.item():.3f}", flush=True)
    return cached


def prepare(work: Path, a: argparse.Namespace) -> dict:
    """Write the budget, the images (array and shard) and the two networks (the classifier
    random or, with --train-classifier, trained; the EBM random)."""
    images, labels, _ = datasets.load_split("digits", "test")
    big = upscale(images[:a.images])  # [N, 32, 32, 3]
    np.save(work / "images.npy", big)
    np.save(work / "labels.npy", labels[:a.images].astype(np.int64))
    writer = ShardWriter(str(work / "shards"), samples_per_shard=a.images, meta={"source": "digits32"})
    for i in range(a.images):
        writer.write(f"digits32-{i:04d}", big[i], int(labels[i]))
    writer.close()
    with torch.random.fork_rng(devices=[]):   # the same random EBM whether or not the WRN is trained
        torch.manual_seed(NETS_SEED)
        torch.save(WideResNetMeliketoy(a.depth, a.widen, 10).state_dict(), work / "clf.pth")
        torch.save(EBM(n_c=3, n_f=32, leak=0.05, image_size=32).state_dict(), work / "ebm.pth")
    if a.train_classifier:
        shutil.copyfile(train_classifier(work, a), work / "clf.pth")
    budget = {k: getattr(a, k) for k in ("images", "langevin_steps", "langevin_eps", "attack_steps", "eot",
                                         "chains", "eps_255", "step_255", "depth", "widen")}
    (work / "budget.json").write_text(json.dumps(budget))
    (work / "hook").mkdir(exist_ok=True)
    (work / "hook" / "sitecustomize.py").write_text(ROW_HOOK)
    return {"pattern": writer.pattern()}


def bare_accuracy(work: Path, a: argparse.Namespace) -> str:
    """How many images the bare classifier (no purifier) gets right through each side's input
    path — the script's nets.WideResNet (or, without --official, ours) on [−1, 1], and advpure's
    `wideresnet` builder with the job's params on [0, 1] pixels — and on how many the two
    predictions agree (all of them, or the sides do not classify the same inputs)."""
    from pipeline.registry import CLASSIFIERS

    images, labels = np.load(work / "images.npy"), torch.from_numpy(np.load(work / "labels.npy"))
    if a.official is not None:
        spec = importlib.util.spec_from_file_location("hill_official_nets", a.official / "nets.py")
        nets = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nets)
        script = nets.WideResNet(a.depth, a.widen, 10)
    else:
        script = WideResNetMeliketoy(a.depth, a.widen, 10)
    script.load_state_dict(torch.load(work / "clf.pth", weights_only=True))
    ours = CLASSIFIERS.build("wideresnet", **classifier_params(work, a))
    with torch.no_grad():
        theirs = script.eval()(to_pm1(images)).argmax(1)
        mine = ours(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).argmax(1)
    side = "script" if a.official else "restated"
    return (f"{side} {int((theirs == labels).sum())}, advpure {int((mine == labels).sum())} of {len(labels)} "
            f"right; predictions agree on {int((theirs == mine).sum())}")


def classifier_params(work: Path, a: argparse.Namespace) -> dict:
    """advpure's classifier params: the `hill` preset (meliketoy layout, mean = std = 0.5)."""
    return {"checkpoint": str(work / "clf.pth"), "depth": a.depth, "widen_factor": a.widen, "preset": "hill"}


def runs(a: argparse.Namespace) -> int:
    """advpure's evaluation.runs: --runs, else H (the paper's evaluation draws)."""
    return a.chains if a.runs is None else a.runs


def channels_last(value: str) -> bool | str:
    """--channels-last auto|true|false as evaluation.channels_last."""
    return value if value == "auto" else value == "true"


def advpure_config(work: Path, a: argparse.Namespace, seed: int, pattern: str, verdict: str) -> tuple[Path, Path]:
    """(the run's output folder, its job file)."""
    overrides = {"eps": a.eps_255 / 255, "step_size": a.step_255 / 255, "steps": a.attack_steps,
                 "eot": a.eot, "recheck_draws": a.chains}
    cfg = {"job": {"name": "hill_reference", "output": str(work / f"advpure-{seed}-{time.time_ns()}"),
                   "seed": seed},
           "data": {"shards": pattern, "batch_size": a.images},
           "classifier": {"name": "wideresnet", "params": classifier_params(work, a)},
           "purifier": {"name": "langevin_ebm", "params": {
               "checkpoint": str(work / "ebm.pth"), "net": {"n_c": 3, "n_f": 32, "leak": 0.05, "image_size": 32},
               "steps": a.langevin_steps, "eps": a.langevin_eps, "clip_output": False}},
           "attacks": [{"preset": "hill2021", "overrides": overrides}],
           "evaluation": {"runs": runs(a), "channels_last": channels_last(a.channels_last), "verdict": verdict,
                          **({} if a.check_samples is None else {"check_samples": a.check_samples})},
           "cluster": {"executor": a.executor, "num_workers": a.workers, "cpus_per_worker": a.threads / a.workers}}
    path = work / f"job-{seed}-{verdict}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Path(cfg["job"]["output"]), path


def advpure_record(out: Path, steps: int) -> tuple[list[int], list[bool]]:
    """(images defended before the attack (the clean verdict under the job's decision rule,
    mean logits) and after each iterate 0 … steps (no confirmed break yet), then the robust
    count (the record, and with verdict runs the final evaluation); each image's verdict, in
    image order)."""
    from pipeline.report.load import iter_committed

    cols = ["key", "label", "clean_decision_pred", "broken_step", "robust"]
    rows = sorted((r for _, _, t in iter_committed(str(out), "evaluate", cols) for r in t.to_pylist()),
                  key=lambda r: r["key"])
    ok = [r for r in rows if r["clean_decision_pred"] == r["label"]]
    record = [len(ok)] + [sum(1 for r in ok if not 0 <= r["broken_step"] <= s) for s in range(steps + 1)]
    return record + [sum(1 for r in rows if r["robust"])], [bool(r["robust"]) for r in rows]


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process and the children it waited
    for — on a loaded machine the wall depends on the others' work, the CPU time much less;
    Ray's own processes, which the run does not wait for, are not in it)."""
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}); its output: {log}")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def run_reference(work: Path, a: argparse.Namespace, seed: int, official: bool) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks/hill_official.py"), str(work), "--seed", str(seed),
           "--threads", str(a.threads)] + (["--official", str(a.official)] if official else [])
    log = work / f"{'official' if official else 'restated'}-{seed}-{time.time_ns()}.log"
    wall, cpu = timed(cmd, dict(os.environ), log)
    line = [ln for ln in log.read_text().splitlines() if ln.startswith("HILL_RESULT ")][-1]
    return {"wall": wall, "cpu": cpu, **json.loads(line.split(" ", 1)[1])}


def run_advpure(work: Path, a: argparse.Namespace, seed: int, pattern: str, verdict: str) -> dict:
    out, job = advpure_config(work, a, seed, pattern, verdict)
    rows_file = work / f"rows-{out.name}.txt"
    env = {**os.environ, "HILL_BENCH_ROWS": str(rows_file),
           "PYTHONPATH": os.pathsep.join([str(work / "hook"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    wall, cpu = timed([sys.executable, "-m", "pipeline.cli", "run", str(job)], env, work / f"{out.name}.log")
    parts: dict[str, int] = {}
    for line in (rows_file.read_text().splitlines() if rows_file.exists() else []):
        n, part = line.split()
        parts[part] = parts.get(part, 0) + int(n)
    record, verdicts = advpure_record(out, a.attack_steps)
    side = f"advpure-{a.executor}" + ("" if verdict == "runs" else f"-{verdict}")
    return {"side": side, "wall": wall, "cpu": cpu, "chain_rows": sum(parts.values()),
            "parts": parts, "record": record, "verdicts": verdicts}


def run_pair(work: Path, a: argparse.Namespace, seed: int, pattern: str, refs: list[bool],
             advpure_first: bool) -> list[dict]:
    """One process per side, back to back; refs: True for the official script, False the
    re-statement; then one advpure run per --verdicts value (reversed when advpure goes first)."""
    order: list = [*refs, *a.verdicts]
    if advpure_first:
        order = [*reversed(a.verdicts), *refs]
    return [run_advpure(work, a, seed, pattern, s) if isinstance(s, str) else run_reference(work, a, seed, s)
            for s in order]


PARTS = ("calibration", "checks", "clean", "attack", "re-checks", "final", "other")


def parts_text(r: dict) -> str:
    """Chain rows per part (those that ran), e.g. "clean 368, attack 480, re-checks 16"."""
    return ", ".join(f"{p} {r['parts'][p]}" for p in PARTS if r["parts"].get(p))


def show(seed: int, r: dict) -> None:
    print(f"seed {seed}  {r['side']:<14} {r['wall']:7.1f} s (CPU {r['cpu']:.1f} s)  "
          f"chain rows {r['chain_rows']:5d} ({parts_text(r)})  "
          f"record {r['record']}  load {os.getloadavg()[0]:.1f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, default=None, help="folder holding the script's bpda_eot_attack.py")
    ap.add_argument("--restated", action="store_true", help="with --official: run the re-statement as well")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--langevin-steps", type=int, default=20)
    ap.add_argument("--langevin-eps", type=float, default=0.01)
    ap.add_argument("--attack-steps", type=int, default=5)
    ap.add_argument("--eot", type=int, default=4)
    ap.add_argument("--chains", type=int, default=16, help="H: re-check chains and evaluation runs")
    ap.add_argument("--runs", type=int, default=None,
                    help="advpure's evaluation.runs R (default: H, the paper's evaluation draws; 1 is advpure's "
                         "default; the script evaluates clean images by its EOT forward and the re-check of its "
                         "candidates, and runs no final evaluation)")
    ap.add_argument("--eps-255", type=float, default=8.0)
    ap.add_argument("--step-255", type=float, default=2.0)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--widen", type=int, default=2)
    ap.add_argument("--train-classifier", type=int, default=0, metavar="EPOCHS",
                    help="train the WRN this many epochs on the digits train split first (seeded, CPU, "
                         "--threads threads; about 4 s an epoch on 2 idle cores; cached in --work), so clean "
                         "images are classified right, the attack has work to do and verdicts mean "
                         "something; 0 (default): random weights, as before. The EBM stays random: with K "
                         "Langevin steps it acts as a noise-like purifier")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads of a reference side and of --train-classifier; advpure's CPUs")
    ap.add_argument("--workers", type=int, default=1, help="advpure actors (threads ÷ workers CPUs each)")
    ap.add_argument("--executor", choices=("auto", "local", "ray"), default="auto", help="advpure's cluster.executor")
    ap.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto",
                    help="advpure's evaluation.channels_last (auto: measured per worker, the default)")
    ap.add_argument("--check-samples", type=int, default=None,
                    help="advpure's evaluation.check_samples (default: the config's default, 16)")
    ap.add_argument("--verdicts", nargs="+", choices=("runs", "recheck"), default=["runs"],
                    help="advpure's evaluation.verdict, one advpure run per value in each pair (runs: R-run "
                         "evaluations decide, the default; recheck: the script's own record)")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--work", type=Path, default=None, help="keep inputs, logs and records here")
    a = ap.parse_args()
    if a.official is not None and not (a.official / "bpda_eot_attack.py").is_file():
        print(f"--official {a.official}: no bpda_eot_attack.py there (give the folder of a "
              "point0bar1/ebm-defense checkout)", file=sys.stderr)
        return 2
    refs = ([True] if a.official else []) + ([False] if a.restated or not a.official else [])
    with tempfile.TemporaryDirectory() as tmp:
        work = (a.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        pattern = prepare(work, a)["pattern"]
        clf = f"trained {a.train_classifier} epochs" if a.train_classifier else "random"
        print(f"bare classifier ({clf}) on the clean images: {bare_accuracy(work, a)}", flush=True)
        print(f"{a.images} digits at 32×32×3, WRN-{a.depth}-{a.widen} {clf}, EBM random, K = {a.langevin_steps}, "
              f"{a.attack_steps} steps, EOT {a.eot}, H = {a.chains}, R = {runs(a)}, ε = {a.eps_255}/255; reference "
              f"{a.threads} threads, advpure {a.workers} worker(s), executor {a.executor}; "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        results: list[tuple[int, dict, list[dict]]] = []
        for n, (seed, _) in enumerate((s, i) for s in a.seeds for i in range(a.pairs)):
            out = run_pair(work, a, seed, pattern, refs, advpure_first=bool(n % 2))  # alternating order
            for r in out:
                show(seed, r)
            theirs = [r for r in out if not r["side"].startswith("advpure")]
            results += [(seed, mine, theirs) for mine in out if mine["side"].startswith("advpure")]
        summarise(results)
    return 0


def summarise(results: list[tuple[int, dict, list[dict]]]) -> None:
    print("\n| seed | reference | reference s | advpure s | advpure ÷ reference | CPU s ref / advpure (÷) | chain rows "
          "ref / advpure (per image) | reference parts | advpure parts | evaluation share (advpure) | verdicts agree |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {}
    for seed, mine, refs in results:
        n = len(mine["verdicts"])
        attack = sum(mine["parts"].get(p, 0) for p in ("attack", "re-checks"))
        share = 1 - attack / mine["chain_rows"] if mine["chain_rows"] else float("nan")
        for r in refs:
            ratio = mine["wall"] / r["wall"]
            ratios.setdefault(f"{r['side']} ({mine['side']})", []).append(ratio)
            agree = sum(u == v for u, v in zip(r["verdicts"], mine["verdicts"]))
            print(f"| {seed} | {r['side']} vs {mine['side']} | {r['wall']:.1f} | {mine['wall']:.1f} | {ratio:.2f} | "
                  f"{r['cpu']:.1f} / {mine['cpu']:.1f} ({mine['cpu'] / r['cpu']:.2f}) | "
                  f"{r['chain_rows']} / {mine['chain_rows']} "
                  f"({r['chain_rows'] / n:.1f} / {mine['chain_rows'] / n:.1f}) "
                  f"| {parts_text(r)} | {parts_text(mine)} | {100 * share:.0f} % | {agree} of {n} |")
    for side, rs in ratios.items():
        print(f"advpure ÷ {side}: median {statistics.median(rs):.2f} (range {min(rs):.2f}–{max(rs):.2f}, "
              f"{len(rs)} pairs); above 1 means advpure is slower")


if __name__ == "__main__":
    raise SystemExit(main())
