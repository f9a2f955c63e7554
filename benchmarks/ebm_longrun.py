"""Does a trained EBM defend by long-run Langevin dynamics (Hill et al. 2021), on held-out images?

    python benchmarks/ebm_longrun.py --ebm runs/models/digits_ebm.pt --classifier runs/models/digits_cnn.pt \\
        --data digits [--count 200] [--chains 16] [--steps 1500] [--eps 0.01] [--threads 1] [--json out.json]

Measures the two targets that need no attack (docs/adp_ebm.md, "Long-run stability"):

(1) class retention: chains started at clean held-out images, K steps of the `langevin_ebm`
    purifier (ε = 0.01, keyed noise, clipped output as in the configs); the bare classifier's
    accuracy on every chain state (target ≥ 90 %) and the EOT defense's (H chains, mean
    logits; target ≥ 95 % of the clean accuracy), with Wilson 95 % intervals; the energy of
    the images and of the chain states (a chain that falls far below the data level drifts);
(2) purification, not drift: held-out images + N(0, σ²), σ in --sigmas, clipped; PSNR to the
    clean images every --every steps (the table), the final PSNR must beat the start and lie
    within 1 dB of the best point of the chain.

The third target (robustness under the hill2021 protocol) is an `advpure run` of
configs/ebm_digits.yaml / configs/ebm_mnist.yaml, read with `advpure report`.
Held-out images: digits `test` (the images of the digits shards), MNIST `t10k-holdout`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.purifiers.nets import ebm_nets  # noqa: E402
from pipeline.registry import CLASSIFIERS  # noqa: E402
from pipeline.train import common, heldout  # noqa: E402

HELD_OUT = {"digits": "test", "mnist": "t10k-holdout"}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of k/n (95 % for z = 1.96)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def pct(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:5.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def retention(args: argparse.Namespace, net: torch.nn.Module, classify, x: torch.Tensor, y: torch.Tensor) -> dict:
    r = heldout.langevin_retention(net, classify, x, y, args.steps, args.eps, args.chains, args.seed)
    n, clean, eot = r["images"], r["clean_correct"], r["eot_correct"]
    r["per_chain_ok"] = r["chain_correct"] >= 0.9 * r["chain_total"]
    r["eot_ok"] = eot >= 0.95 * clean
    print(f"(1) chains from {n} clean held-out images, K = {args.steps}, ε = {args.eps}, H = {args.chains}")
    print(f"    bare classifier, clean images   {pct(clean, n)}")
    print(f"    every chain state after K       {pct(r['chain_correct'], r['chain_total'])}"
          f"   target ≥ 90 %: {'yes' if r['per_chain_ok'] else 'NO'}")
    print(f"    EOT defense (mean logits of H)  {pct(eot, n)}   = {100 * eot / max(1, clean):.1f} % of clean"
          f" (target ≥ 95 %): {'yes' if r['eot_ok'] else 'NO'}")
    print(f"    energy U: images {r['energy_data']:.5f}, chain states {r['energy_chain']:.5f}"
          f" (drop {r['energy_data'] - r['energy_chain']:.5f} ± {r['energy_drop_se']:.5f} s.e.)")
    return r


def purification(args: argparse.Namespace, net: torch.nn.Module, x: torch.Tensor) -> dict:
    curves = {s: heldout.langevin_psnr(net, x, s, args.steps, args.eps, args.every, args.seed) for s in args.sigmas}
    verdicts = {s: heldout.psnr_verdict(c) for s, c in curves.items()}
    print(f"(2) PSNR (dB) to the clean image along the chain, {len(x)} held-out images + N(0, σ²), clipped")
    print("    step " + "".join(f"   σ = {s:<5g}" for s in args.sigmas) + "   (mean energy U)")
    for i, row in enumerate(curves[args.sigmas[0]]):
        vals = "".join(f"   {curves[s][i][1]:9.2f}" for s in args.sigmas)
        energies = ", ".join(f"{curves[s][i][2]:.5f}" for s in args.sigmas)
        print(f"    {row[0]:5d}{vals}   ({energies})")
    for s, v in verdicts.items():
        print(f"    σ = {s:g}: {v['start_db']:.2f} → {v['final_db']:.2f} dB, best {v['best_db']:.2f} at step "
              f"{v['best_step']}; improves: {'yes' if v['improves'] else 'NO'}, within 1 dB of best: "
              f"{'yes' if v['near_best'] else 'NO'}")
    return {"curves": {str(s): c for s, c in curves.items()}, "verdicts": {str(s): v for s, v in verdicts.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ebm", required=True, help="EBM checkpoint (jobs/train_ebm.py)")
    p.add_argument("--classifier", required=True, help="small_cnn checkpoint (jobs/train_classifier.py)")
    p.add_argument("--data", choices=sorted(HELD_OUT), default="digits")
    p.add_argument("--path", default=None, help="MNIST folder (default ../shared/data/mnist)")
    p.add_argument("--split", default=None, help="held-out split (default: digits test, mnist t10k-holdout)")
    p.add_argument("--count", type=int, default=200, help="held-out images (the first of the split)")
    p.add_argument("--chains", type=int, default=16, help="EOT defense chains H per image (paper: 150)")
    p.add_argument("--steps", type=int, default=1500, help="Langevin steps K (paper: 1500)")
    p.add_argument("--eps", type=float, default=0.01, help="Langevin noise ε (paper: 0.01)")
    p.add_argument("--every", type=int, default=100, help="PSNR table row every this many steps")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--skip", choices=("retention", "psnr"), default=None, help="leave out one measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = common.load_or_exit(args.data, args.split or HELD_OUT[args.data], args.path)
    x, y = x[:args.count], y[:args.count]
    net, info = ebm_nets.load_ebm(args.ebm)
    classify = CLASSIFIERS.build("small_cnn", checkpoint=args.classifier)
    t0, c0 = time.time(), time.process_time()
    out: dict = {"ebm": args.ebm, "classifier": args.classifier, "data": args.data, "count": len(x)}
    if args.skip != "retention":
        out["retention"] = retention(args, net, classify, x, y)
    if args.skip != "psnr":
        out["purification"] = purification(args, net, x)
    out["seconds"], out["cpu_seconds"] = time.time() - t0, time.process_time() - c0
    print(f"{out['seconds']:.0f} s wall, {out['cpu_seconds']:.0f} s CPU (threads {args.threads})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    passed = all([out.get("retention", {}).get("per_chain_ok", True), out.get("retention", {}).get("eot_ok", True),
                  *(v["passed"] for v in out.get("purification", {}).get("verdicts", {}).values())])
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
