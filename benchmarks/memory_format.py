"""The networks' memory format (evaluation.channels_last): per-row time of a forward and an
input-gradient backward, contiguous against channels-last weights, side by side.

    python benchmarks/memory_format.py [--rows 64 256] [--threads 1] [--rounds 5]

Networks: the small MNIST CNN (28×28×1, the autoattack benchmark's), the Hill script's
WideResNet-10-2 (meliketoy layout) and its lightweight EBM (n_f 32), both 32×32×3 — random
weights (the format's cost does not depend on them), frozen as a worker freezes them. Each
round times both formats in turn through `pipeline.evaluation.memory_format` (the switch the
workers use: weights converted in place, outputs and input gradients kept contiguous); the
median per row and the ratio are printed, and the largest difference between the two
formats' gradients (float32 rounding).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.classifiers.small_cnn import make as make_cnn  # noqa: E402
from pipeline.classifiers.wideresnet import make_net  # noqa: E402
from pipeline.evaluation import memory_format  # noqa: E402
from pipeline.purifiers.nets.ebm_nets import EBM  # noqa: E402


def step(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xi).float().sum(), xi)
    return g


def seconds_per_row(net: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        step(net, x)
    return (time.perf_counter() - t0) / reps / x.shape[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    nets = {"small CNN (28×28×1)": (make_cnn(), (1, 28, 28)),
            "WRN-10-2 (32×32×3)": (make_net("meliketoy", 10, 2), (3, 32, 32)),
            "EBM n_f 32 (32×32×3)": (EBM(n_c=3, n_f=32, leak=0.05, image_size=32), (3, 32, 32))}
    print(f"torch {torch.__version__}, {a.threads} thread(s), {a.rounds} rounds; ms per row, forward + input gradient")
    print("| network | rows | contiguous | channels-last | channels-last ÷ contiguous | max |Δ grad| |")
    print("|---|---|---|---|---|---|")
    for name, (net, shape) in nets.items():
        net = net.eval().requires_grad_(False)
        for rows in a.rows:
            x = torch.rand(rows, *shape)
            reps = max(1, round(0.05 / max(1e-6, seconds_per_row(net, x, 1) * rows)))
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(a.rounds):
                for cl in (False, True):
                    switch = memory_format.ChannelsLast([net]) if cl else None
                    seconds_per_row(net, x, 1)   # warm-up in this format
                    times[cl].append(seconds_per_row(net, x, reps))
                    if switch is not None:
                        switch.undo()
            g0 = step(net, x)
            switch = memory_format.ChannelsLast([net])
            g1 = step(net, x)
            switch.undo()
            c, cl_s = statistics.median(times[False]), statistics.median(times[True])
            diff = (g0 - g1).abs().max()
            print(f"| {name} | {rows} | {1e3 * c:.3f} | {1e3 * cl_s:.3f} | {cl_s / c:.2f} | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
