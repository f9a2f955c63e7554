"""DiffPure's gradient methods side by side: torchsde's stochastic adjoint against the exact
gradient through the unrolled solver, on the same keyed Brownian path.

    python benchmarks/diffpure_adjoint.py [--checkpoint runs/models/digits_diffusion.pt] \
        [--t-star 0.1] [--dt 0.01 0.001 0.00025] [--images 8] [--threads 1]

For each dt: the largest difference of the two methods' forward outputs (the same path, so
float rounding only), and per held-out digit the cosine and the relative error
‖g_adjoint − g_exact‖ / ‖g_exact‖ of the input gradient of a fixed random linear functional
of the purified output (unclipped; a functional, not a saturated classifier loss, so the
gradient is well away from float32 underflow), with each method's seconds. Needs torchsde.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.io import datasets  # noqa: E402
from pipeline.registry import PURIFIERS  # noqa: E402
from pipeline.seeding import Noise  # noqa: E402


def compare(checkpoint: str, x: torch.Tensor, t_star: float, dt: float) -> dict[str, float]:
    keys = [f"digit{i}" for i in range(len(x))]
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    outs, grads, secs = {}, {}, {}
    for method in ("exact", "adjoint"):
        pur = PURIFIERS.build("diffpure", checkpoint=checkpoint, t_star=t_star, dt=dt, gradient_method=method,
                              clip_output=False)
        xi = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = pur(xi, Noise.for_batch(0, keys, "benchmark/adjoint"))
        grads[method] = torch.autograd.grad((out * w).sum(), xi)[0].flatten(1).double()
        secs[method] = time.perf_counter() - t0
        outs[method] = out.detach()
    g0, g1 = grads["exact"], grads["adjoint"]
    cos = (g0 * g1).sum(1) / (g0.norm(dim=1) * g1.norm(dim=1))
    rel = (g1 - g0).norm(dim=1) / g0.norm(dim=1)
    return {"steps": pur.n_steps, "forward_max_diff": float((outs["exact"] - outs["adjoint"]).abs().max()),
            "cos_min": float(cos.min()), "cos_median": float(cos.median()),
            "rel_median": float(rel.median()), "rel_max": float(rel.max()),
            "s_exact": secs["exact"], "s_adjoint": secs["adjoint"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/models/digits_diffusion.pt")
    p.add_argument("--t-star", type=float, default=0.1)
    p.add_argument("--dt", type=float, nargs="+", default=[0.01, 0.001, 0.00025])
    p.add_argument("--images", type=int, default=8, help="held-out digits (the test split's first)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images, _, _ = datasets.load_split("digits", "test")
    x = datasets.to_float_nchw(images[:args.images])
    print("| dt (steps) | forward max abs. difference | cosine min / median | relative error median / max "
          "| s exact | s adjoint |")
    print("|---|---|---|---|---|---|")
    for dt in args.dt:
        r = compare(args.checkpoint, x, args.t_star, dt)
        print(f"| {dt:g} ({r['steps']}) | {r['forward_max_diff']:.1e} | {r['cos_min']:.3f} / {r['cos_median']:.3f} "
              f"| {r['rel_median']:.2g} / {r['rel_max']:.2g} | {r['s_exact']:.1f} | {r['s_adjoint']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
