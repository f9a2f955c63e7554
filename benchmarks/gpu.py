"""Issue 12's GPU figures in one command: attack throughput by precision, memory format and
compile, purifier steps, keyed-noise share, replica batching and checkpointed memory.

    python benchmarks/gpu.py [--device cuda] [--only attack purify noise replicas checkpoint]
                             [--out gpu-bench.json] [--batch-wrn 512] [--batch-resnet 256] [--steps 5]
                             [--peak-tflops T] [--no-compile] [--smoke] (more sizes: --help)

Sections (--only picks some; each one that fails records its error and the others still run):
- attack: the project's PGD (ℓ∞, ε 8/255, --steps steps, keep_broken False: per step one forward
  and one backward to the input, sign step, projection) through Defense.attack_target
  ("classifier" view) on WRN-28-10 (3×32×32, --batch-wrn) and ResNet-50 (224 px,
  --batch-resnet), random init, frozen. Modes: fp32 | bf16 | bf16+cl (speed_up, the product's
  path: bf16 autocast, channels_last) | bf16+cl+compile (FastNet(compile=True) — speed_up compiles
  purifier networks only, so this row is what compiling the classifier would give). Image-steps/s,
  attacks/s, ms per step, peak allocated memory, and TFLOP/s = FLOPs of one forward + backward
  (FlopCounterMode on the eager fp32 net) × steps / time, as a fraction of the device's dense bf16
  peak (a table by device name, or --peak-tflops).
- purify: one Langevin step of the CIFAR EBM (--rows-ebm rows) in fp32, bf16, bf16+cl and
  bf16+cl+compile; one ADP iteration (NCSNv2 CIFAR, --rows-adp rows) in fp32 and fp32+cl (ADP is
  not autocast-safe: speed_up keeps it fp32). Under no_grad, as an evaluation runs them.
- noise: the keyed draw (`Noise.normal`) against a whole Langevin step (fp32 and bf16 network)
  and `torch.randn`, at --chains × --noise-batch rows (benchmarks/noise_share.py, on the device).
- replicas: R draws as one [B·R] tensor against a Python loop over the draws
  (benchmarks/replicas.py on the device): eot — a full-gradient step through Gaussian noise
  (σ 0.25) + WRN-28-10, 16 samples × 16 draws; langevin — 8 images × 150 chains × 10 steps of
  the CIFAR EBM.
- checkpoint: one full gradient through K Langevin steps (--ks, --ckpt-rows rows of the CIFAR
  EBM) with checkpoint_segment 0 (none) and −1 (auto): peak allocated memory and time. A `none`
  cell whose memory, extrapolated from the largest K before, would pass 90 % of the device is
  skipped; an out-of-memory error is recorded as such (benchmarks/checkpointing.py on the device).

Timing: warm-up call(s), then --repeats timed calls, each closed by torch.cuda.synchronize();
the median. Memory: torch.cuda.max_memory_allocated, reset per cell (on CPU: not measured).
Random-init networks (speed does not depend on the weights). Every row is printed as it comes
and the JSON (--out: device, torch, date, arguments, rows per section) is rewritten after each.
Exit status 1 if any section or row failed. Defaults: about 5–6 min on an H200, most of it
torch.compile; --smoke (tiny sizes, 1 step) runs on a CPU in well under a minute.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.evaluation import defense  # noqa: E402
from pipeline.evaluation.defense import Defense, FastNet, autocast_safe, speed_up  # noqa: E402
from pipeline.evaluation.row_chunks import is_out_of_memory  # noqa: E402
from pipeline.purifiers import steps  # noqa: E402
from pipeline.purifiers.identity import IdentityPurifier  # noqa: E402
from pipeline.seeding import Noise  # noqa: E402

SECTIONS = ("attack", "purify", "noise", "replicas", "checkpoint")
# dense bf16 tensor-core peaks (vendor datasheets, without sparsity); first match of the name wins
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.5), ("NVL", 835.5), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0),
                    ("L40S", 362.05))
# mode → (precision, channels_last, compile)
MODES = {"fp32": ("fp32", False, False), "fp32+cl": ("fp32", True, False), "bf16": ("bf16", False, False),
         "bf16+cl": ("bf16", True, False), "bf16+cl+compile": ("bf16", True, True)}
FULL = dict(batch_wrn=512, batch_resnet=256, steps=5, repeats=3, rows_ebm=4096, rows_adp=256, chains=150,
            noise_batch=32, eot=(16, 16), chains_rep=(8, 150, 10), ks=[10, 100, 1000], ckpt_rows=256)
SMOKE = dict(batch_wrn=2, batch_resnet=2, steps=1, repeats=2, rows_ebm=4, rows_adp=2, chains=2,
             noise_batch=2, eot=(2, 3), chains_rep=(2, 3, 2), ks=[2, 4], ckpt_rows=2)


# ---------------------------------------------------------------------------------------
# Timing, memory, report
# ---------------------------------------------------------------------------------------


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, repeats: int, warmup: int = 1, inner: int = 1) -> float:
    """Median seconds of one fn() call (each timed repeat runs it `inner` times)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(dev)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def fresh_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def allocated_mib(dev: torch.device, peak: bool = True) -> float | None:
    if dev.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(dev) if peak else torch.cuda.memory_allocated(dev)) / 2**20


def frozen(m: nn.Module, dev: torch.device) -> nn.Module:
    for q in m.parameters():
        q.requires_grad_(False)
    return m.eval().to(dev)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Report:
    """Rows per section, printed as they come; the whole document rewritten after each row."""

    def __init__(self, path: str, meta: dict):
        self.path, self.doc, self.failed = path, {**meta, "sections": {}}, False
        self.columns: list[str] = []

    def start(self, name: str, columns: list[str]) -> None:
        self.doc["sections"][name] = {"rows": [], "error": None, "seconds": None}
        self.columns = columns
        print(f"\n== {name}\n" + " ".join(f"{c:>14s}" for c in columns), flush=True)
        self.write()

    def row(self, name: str, row: dict) -> None:
        self.doc["sections"][name]["rows"].append(row)
        print(" ".join(f"{_fmt(row.get(c)):>14s}" for c in self.columns), flush=True)
        if row.get("error"):
            self.failed = True
            print(f"   error: {row['error']}", flush=True)
        elif row.get("note"):
            print(f"   {row['note']}", flush=True)
        self.write()

    def end(self, name: str, seconds: float, error: str | None) -> None:
        self.doc["sections"][name].update(seconds=round(seconds, 2), error=error)
        self.failed |= error is not None
        print(f"-- {name}: {seconds:.1f} s" + (f", FAILED: {error}" if error else ""), flush=True)
        self.write()

    def write(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(tmp, self.path)


def cell(report: Report, section: str, row: dict, fn) -> dict:
    """row updated with fn()'s figures, or with the error it raised; one failing cell does
    not stop its section."""
    try:
        row.update(fn())
    except Exception as e:  # noqa: BLE001 — recorded, printed, and the run goes on
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
    report.row(section, row)
    return row


# ---------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------


def classifiers(args) -> list[tuple[str, Callable[[], nn.Module], int, int]]:
    """(name, build, image size, batch) of the attacked classifiers."""
    from pipeline.classifiers.resnet import build_resnet
    from pipeline.classifiers.wideresnet import build_wideresnet

    if args.smoke:
        return [("wrn-10-1", lambda: build_wideresnet(depth=10, widen_factor=1, random_init=True), 32, args.batch_wrn),
                ("resnet50@32", lambda: build_resnet(depth=50, random_init=True), 32, args.batch_resnet)]
    return [("wrn-28-10", lambda: build_wideresnet(depth=28, widen_factor=10, random_init=True), 32, args.batch_wrn),
            ("resnet50@224", lambda: build_resnet(depth=50, random_init=True), 224, args.batch_resnet)]


def ebm(k: int, dev: torch.device, segment: int = -1, clip_output: bool = True):
    from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier, LangevinEBMSettings
    from pipeline.purifiers.nets.ebm_nets import EBM

    torch.manual_seed(0)
    settings = LangevinEBMSettings(steps=k, checkpoint_segment=segment, clip_output=clip_output)
    return frozen(LangevinEBMPurifier(EBM(), settings), dev)


def adp(args, dev: torch.device):
    from pipeline.purifiers.adp import ADPPurifier, ADPSettings
    from pipeline.purifiers.nets.score_nets import NCSNv2, SmallScoreNet

    torch.manual_seed(0)
    net = SmallScoreNet(in_channels=3, width=8) if args.smoke else NCSNv2()
    settings = ADPSettings(max_iter=1, stop_alpha=0.0, checkpoint_segment=0)  # stop_alpha 0: no row stops
    return frozen(ADPPurifier(net, settings), dev)


def images(n: int, size: int, dev: torch.device) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dev)


def keys(n: int) -> list[str]:
    return [f"k{i}" for i in range(n)]


def fwd_bwd_flops(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one forward + backward to the input (what one attack step computes)."""
    from torch.utils.flop_counter import FlopCounterMode

    xx = x.detach().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:  # its module hooks refuse autograd.grad on a leaf
        F.cross_entropy(net(xx), y).backward()  # the parameters are frozen: input gradient only
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


def run_attack(args, dev: torch.device, report: Report) -> None:
    from pipeline.attacks.pgd import PGD

    report.start("attack", ["model", "mode", "batch", "step_ms", "img_steps_s", "attacks_s", "peak_mib",
                            "tflops", "frac_peak"])
    nets, flops = {}, {}
    eager, compiled = ["fp32", "bf16", "bf16+cl"], [] if args.no_compile else ["bf16+cl+compile"]
    # compile rows last: a slow or failing compile costs no eager figure
    plan = [(c, mode) for modes in (eager, compiled) for c in classifiers(args) for mode in modes]

    def measure(name, build, size, batch, mode):
        precision, cl, comp = MODES[mode]
        if name not in nets:
            nets[name] = frozen(build(), dev)
        if name not in flops:
            x0, y0 = images(batch, size, dev), torch.arange(batch, device=dev) % nets[name].num_classes
            flops[name] = fwd_bwd_flops(nets[name], x0, y0)
        net = copy.deepcopy(nets[name])  # channels_last converts a module in place
        model = (FastNet(net, True, True, compile=True) if comp
                 else speed_up(net, IdentityPurifier(), precision, cl))
        x, y = images(batch, size, dev), torch.arange(batch, device=dev) % net.num_classes
        target = Defense(model, IdentityPurifier()).attack_target("classifier", 0, keys(batch), "bench")
        own = Noise.for_batch(0, keys(batch), "bench/own", 1, dev)
        attack = PGD(eps=8 / 255, steps=args.steps, keep_broken=False)
        fresh_memory(dev)
        before = allocated_mib(dev, peak=False)  # weights of every model built so far, inputs
        t = timed(lambda: attack(target, x, y, own), dev, args.repeats, warmup=2 if comp else 1)
        achieved = flops[name] * args.steps / t / 1e12
        return {"step_ms": 1e3 * t / args.steps, "img_steps_s": batch * args.steps / t, "attacks_s": batch / t,
                "attack_s": t, "peak_mib": allocated_mib(dev), "before_mib": before,
                "gflop_per_step": flops[name] / 1e9,
                "tflops": achieved, "frac_peak": achieved / args.peak_tflops if args.peak_tflops else None}

    for (name, build, size, batch), mode in plan:
        row = {"model": name, "mode": mode, "batch": batch, "steps": args.steps}
        cell(report, "attack", row, lambda: measure(name, build, size, batch, mode))  # noqa: B023


def run_purify(args, dev: torch.device, report: Report) -> None:
    report.start("purify", ["purifier", "mode", "net_dtype", "rows", "call_ms", "steps_s", "row_steps_s",
                            "peak_mib"])
    ebm_modes = ["fp32", "bf16", "bf16+cl"] + ([] if args.no_compile else ["bf16+cl+compile"])
    cases = [("langevin-ebm", lambda: ebm(1, dev), args.rows_ebm, m) for m in ebm_modes]
    cases += [("adp-ncsnv2" if not args.smoke else "adp-small", lambda: adp(args, dev), args.rows_adp, m)
              for m in ("fp32", "fp32+cl")]

    def measure(make, rows, mode):
        precision, cl, comp = MODES[mode]
        p = make()
        speed_up(nn.Identity(), p, precision, cl, comp)  # wraps p's networks in place
        x, noise = images(rows, 32, dev), Noise.for_batch(0, keys(rows), "bench", 1, dev)
        fresh_memory(dev)
        with torch.no_grad():
            t = timed(lambda: p.purify(x, noise), dev, args.repeats, warmup=2 if comp else 1)
            nfe = p.purify(x, noise).nfe
        return {"net_dtype": "bf16" if precision == "bf16" and autocast_safe(p) else "fp32", "call_ms": 1e3 * t,
                "steps_s": 1 / t, "row_steps_s": rows / t, "nfe_per_row": nfe, "peak_mib": allocated_mib(dev)}

    for name, make, rows, mode in cases:
        cell(report, "purify", {"purifier": name, "mode": mode, "rows": rows},
             lambda: measure(make, rows, mode))  # noqa: B023


def run_noise(args, dev: torch.device, report: Report) -> None:
    report.start("noise", ["net", "rows", "step_ms", "keyed_ms", "share", "randn_ms", "keyed_randn"])
    rows = args.chains * args.noise_batch
    shape = (3, 32, 32)

    def measure(precision):
        p = ebm(1, dev)
        speed_up(nn.Identity(), p, precision)
        x = images(rows, 32, dev) * 2 - 1
        noise = Noise.for_batch(0, keys(rows), "share", 1, dev)
        draw = lambda: noise.normal(shape, purpose="langevin_ebm/z", step=7)  # noqa: E731

        def step():  # as LangevinEBMPurifier._chain's step
            g = steps.energy_grad(p.energy_net, x)
            return steps.langevin_step(x, g, p.settings.eps, draw())

        with torch.no_grad():
            t_step, t_draw = (timed(f, dev, args.repeats, inner=5) for f in (step, draw))
            t_randn = timed(lambda: torch.randn(rows, *shape, device=dev), dev, args.repeats, inner=5)
        return {"step_ms": 1e3 * t_step, "keyed_ms": 1e3 * t_draw, "share": t_draw / t_step,
                "randn_ms": 1e3 * t_randn, "keyed_randn": t_draw / t_randn}

    for precision in ("fp32", "bf16"):
        cell(report, "noise", {"net": f"ebm-{precision}", "rows": rows, "chains": args.chains,
                               "batch": args.noise_batch}, lambda: measure(precision))  # noqa: B023


def _draw_rows(noise: Noise, r: int, draws: int) -> Noise:
    return noise.select(slice(r, None, draws))  # draw r of every sample (rows are sample-major)


def run_replicas(args, dev: torch.device, report: Report) -> None:
    from pipeline.purifiers.gaussian import GaussianPurifier, GaussianSettings

    report.start("replicas", ["case", "samples", "draws", "batched_ms", "loop_ms", "loop_batched", "max_diff"])

    def eot(b, draws):
        _, build, size, _ = classifiers(args)[0]
        d = Defense(frozen(build(), dev), GaussianPurifier(GaussianSettings(sigma=0.25)))
        x, y = images(b, size, dev), torch.arange(b, device=dev) % 10
        noise = Noise.for_batch(0, keys(b), "eot", draws, dev)

        def grad(nz):
            xx = x.clone().requires_grad_(True)
            z = d.logits(xx, nz, "full")  # [B, R', K]
            loss = F.cross_entropy(z.flatten(0, 1), y.repeat_interleave(z.shape[1]))
            return torch.autograd.grad(loss * z.shape[1], xx)[0]

        return (lambda: grad(noise)), (lambda: sum(grad(_draw_rows(noise, r, draws)) for r in range(draws)))

    def langevin(b, draws, k):
        p = ebm(k, dev)
        x = images(b, 32, dev)
        noise = Noise.for_batch(0, keys(b), "chains", draws, dev)
        xr = x.repeat_interleave(draws, 0)
        return ((lambda: p(xr, noise)),
                (lambda: torch.stack([p(x, _draw_rows(noise, r, draws)) for r in range(draws)], 1).flatten(0, 1)))

    def measure(make, grad_mode):
        batched, loop = make()
        with torch.set_grad_enabled(grad_mode):
            tb, tl = timed(batched, dev, args.repeats), timed(loop, dev, args.repeats)
            diff = float((batched() - loop()).abs().max())
        return {"batched_ms": 1e3 * tb, "loop_ms": 1e3 * tl, "loop_batched": tl / tb, "max_diff": diff}

    (eb, ed), (lb, ld, lk) = args.eot, args.chains_rep
    cell(report, "replicas", {"case": "eot", "samples": eb, "draws": ed},
         lambda: measure(lambda: eot(eb, ed), True))
    cell(report, "replicas", {"case": f"langevin-k{lk}", "samples": lb, "draws": ld, "steps": lk},
         lambda: measure(lambda: langevin(lb, ld, lk), False))


def run_checkpoint(args, dev: torch.device, report: Report) -> None:
    report.start("checkpoint", ["k", "mode", "rows", "seconds", "peak_mib", "before_mib", "status"])
    x = images(args.ckpt_rows, 32, dev)
    noise = Noise.for_batch(0, keys(args.ckpt_rows), "bench", 1, dev)
    per_step_mib = None  # of `none`, from the largest K measured so far
    total_mib = torch.cuda.get_device_properties(dev).total_memory / 2**20 if dev.type == "cuda" else None

    def gradient(p):
        xx = x.clone().requires_grad_(True)
        return torch.autograd.grad((p(xx, noise) ** 2).sum(), xx)[0]

    def measure(k, mode):
        nonlocal per_step_mib
        seg = {"none": 0, "auto": -1}[mode]
        if mode == "none" and per_step_mib and total_mib and per_step_mib * k > 0.9 * total_mib:
            return {"status": f"skipped: ~{per_step_mib * k / 1024:.0f} GiB estimated, "
                              f"{total_mib / 1024:.0f} GiB on the device"}
        gradient(ebm(2, dev, seg, clip_output=False))  # first-call costs (allocator, kernels)
        p = ebm(k, dev, seg, clip_output=False)
        fresh_memory(dev)
        before = allocated_mib(dev, peak=False)
        try:
            t = timed(lambda: gradient(p), dev, args.repeats if k <= 100 else 1, warmup=0)
        except Exception as e:  # noqa: BLE001 — the worker's own test for an allocation failure
            if not is_out_of_memory(e):
                raise
            return {"status": f"out of memory: {str(e).splitlines()[0][:300]}", "peak_mib": allocated_mib(dev)}
        peak = allocated_mib(dev)
        if mode == "none" and peak is not None:
            per_step_mib = (peak - before) / k
        return {"seconds": t, "peak_mib": peak, "before_mib": before, "status": "ok"}

    for k in args.ks:
        for mode in ("none", "auto"):
            cell(report, "checkpoint", {"k": k, "mode": mode, "rows": args.ckpt_rows},
                 lambda: measure(k, mode))  # noqa: B023
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()  # an out-of-memory cell must not starve the next


RUNNERS = {"attack": run_attack, "purify": run_purify, "noise": run_noise, "replicas": run_replicas,
           "checkpoint": run_checkpoint}


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def device_peak(name: str) -> float | None:
    return next((t for key, t in PEAK_BF16_TFLOPS if key in name), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: the whole run in < 1 min on a CPU")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--out", default="gpu-bench.json")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device (default: by its name)")
    ap.add_argument("--batch-wrn", type=int)
    ap.add_argument("--batch-resnet", type=int)
    ap.add_argument("--steps", type=int, help="PGD steps per timed attack")
    ap.add_argument("--repeats", type=int, help="timed calls per cell (median)")
    ap.add_argument("--rows-ebm", type=int, help="rows per Langevin step call (purify)")
    ap.add_argument("--rows-adp", type=int, help="rows per ADP iteration call (purify)")
    ap.add_argument("--chains", type=int, help="chains per image (noise)")
    ap.add_argument("--noise-batch", type=int, help="images (noise)")
    ap.add_argument("--ks", type=int, nargs="+", help="Langevin steps K (checkpoint)")
    ap.add_argument("--ckpt-rows", type=int, help="rows differentiated through K steps (checkpoint)")
    args = ap.parse_args()
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (torch.cuda.is_available() is False); use --device cpu for a smoke run")
        return 2
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    peak_source = "--peak-tflops" if args.peak_tflops else "table"
    args.peak_tflops = args.peak_tflops or device_peak(name)
    if "attack" in args.only and not args.peak_tflops:
        ap.error(f"no dense bf16 peak known for {name!r}: pass --peak-tflops")
    if dev.type == "cpu":
        defense.COMPILE_BACKEND = "aot_eager"  # no C++ build on a CPU (as the tests do)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    meta = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[1:],
            "settings": {k: v for k, v in vars(args).items() if k != "only"},
            "peak_tflops_source": peak_source if args.peak_tflops else None,
            "compile_backend": defense.COMPILE_BACKEND, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "torch_threads": torch.get_num_threads()}
    report = Report(args.out, meta)
    print(f"{name}, torch {torch.__version__}, peak bf16 {args.peak_tflops} TFLOP/s ({peak_source}); "
          f"sections {' '.join(args.only)} → {args.out}", flush=True)
    t_all = time.perf_counter()
    for section in args.only:
        t0, error = time.perf_counter(), None
        try:
            RUNNERS[section](args, dev, report)
        except Exception as e:  # noqa: BLE001 — one failing section must not lose the others
            traceback.print_exc()
            error = f"{type(e).__name__}: {e}"[:2000]
            if section not in report.doc["sections"]:
                report.doc["sections"][section] = {"rows": []}
        report.end(section, time.perf_counter() - t0, error)
        fresh_memory(dev)
    report.doc["seconds"] = round(time.perf_counter() - t_all, 1)
    report.doc["ok"] = not report.failed
    report.write()
    print(f"\n{'ok' if not report.failed else 'FAILED'} in {report.doc['seconds']} s; figures in {args.out}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
