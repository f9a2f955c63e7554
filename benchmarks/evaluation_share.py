"""Where an evaluation's compute goes: the attack against the work around it.

    python benchmarks/evaluation_share.py [--images 100] [--shard 100] [--langevin-steps 300]
        [--attack-steps 20] [--eot 4] [--chains 16] [--eps 0.2] [--threads 1]
        [--ebm runs/models/digits_ebm.pt] [--classifier runs/models/digits_cnn.pt]

Hill et al.'s protocol (`hill2021`: BPDA+EOT, per-step re-check with H chains, R = H
evaluation runs) on the digits EBM and CNN, as an evaluation worker runs it — the shard's
samples through `pipeline.evaluation.stages.evaluate` in this process, no Ray (start-up is
hill_reference.py's business) — with a timer on each piece:
- attack:  `run_attack` (the attack's steps with their EOT draws and the re-checks of
           candidate breaks);
- clean:   `clean_eval` (the undefended prediction and the clean R-run evaluation);
- final:   the R-run evaluation of the attack's output (attack_rows less run_attack);
- checks:  `first_batch_checks` (the gradient-masking checks and EOT probe, per shard).
Prints each piece's seconds and (clean + final + checks) ÷ attack — the issue's target is at
most 0.25. --shard sets the samples per shard (the checks run once per shard).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline import config  # noqa: E402
from pipeline.evaluation import batch, stages  # noqa: E402
from pipeline.evaluation.protocol import build_protocol  # noqa: E402
from pipeline.io import shards as shard_io  # noqa: E402
from pipeline.io.make_shards import make_shards  # noqa: E402

SPENT: collections.Counter = collections.Counter()
INSIDE: list[str] = []   # the checks call attacks too (EOT probe): their time stays the checks'


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        counted = "checks" not in INSIDE
        INSIDE.append(name)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            INSIDE.pop()
            if counted:
                SPENT[name] += time.perf_counter() - t0
    return wrapper


def instrument() -> None:
    """Timers on the pieces, where stages.py and batch.py look them up."""
    batch.run_attack = timed("attack", batch.run_attack)
    batch.attack_rows = stages.attack_rows = timed("attack_rows", batch.attack_rows)
    batch.clean_eval = stages.clean_eval = timed("clean", batch.clean_eval)
    stages.first_batch_checks = timed("checks", stages.first_batch_checks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--shard", type=int, default=100, help="samples per shard")
    ap.add_argument("--langevin-steps", type=int, default=300)
    ap.add_argument("--attack-steps", type=int, default=20)
    ap.add_argument("--eot", type=int, default=4)
    ap.add_argument("--chains", type=int, default=16, help="H: re-check draws and evaluation runs R")
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ebm", default=str(ROOT / "runs/models/digits_ebm.pt"))
    ap.add_argument("--classifier", default=str(ROOT / "runs/models/digits_cnn.pt"))
    ap.add_argument("--workdir", default="/tmp/advpure-evaluation-share")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    doc = make_shards("digits", str(work / "shards"), split="test", samples_per_shard=a.shard, limit=a.images)
    cfg = config.from_dict({
        "job": {"name": "evaluation_share", "output": str(work / "out"), "seed": 0},
        "data": {"shards": doc["pattern"], "batch_size": a.shard},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": a.classifier}},
        "purifier": {"name": "langevin_ebm", "params": {"checkpoint": a.ebm, "steps": a.langevin_steps,
                                                        "eps": 0.01, "clip_output": True}},
        "attacks": [{"preset": "hill2021", "overrides": {"eps": a.eps, "steps": a.attack_steps, "eot": a.eot,
                                                         "recheck_draws": a.chains, "step_size": a.eps / 4}}],
        "evaluation": {"runs": a.chains, "max_rows": 4096, "device": "cpu"}})
    p = build_protocol(cfg)
    instrument()
    t0 = time.perf_counter()
    rows = 0
    for url in shard_io.expand(doc["pattern"]):
        rows += len(stages.evaluate(p, shard_io.ShardStream(url, chunk=p.batch_size)).rows)
    total = time.perf_counter() - t0
    attack = SPENT["attack"]
    final = SPENT["attack_rows"] - attack
    around = SPENT["clean"] + final + SPENT["checks"]
    print(f"{a.images} digits in shards of {a.shard}, K = {a.langevin_steps}, {a.attack_steps} steps, EOT {a.eot}, "
          f"H = R = {a.chains}, {a.threads} thread(s); load average {os.getloadavg()[0]:.1f}; {rows} rows")
    for name, s in (("attack (steps + re-checks)", attack), ("clean evaluation", SPENT["clean"]),
                    ("final evaluation", final), ("checks", SPENT["checks"]), ("total", total)):
        print(f"  {name:28s} {s:8.1f} s")
    print(f"(clean + final + checks) / attack = {around / attack:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
