"""`advpure plan` for configs/diffpure_cifar10.yaml and configs/diffpure_imagenet.yaml on a CPU,
with random weights in the published checkpoint layouts (the real files cannot be downloaded here).

    python benchmarks/diffpure_plan.py [--out /tmp/diffpure_plan] [--only cifar10|imagenet]
                                       [--threads 1] [--timeout 1800]
    python benchmarks/diffpure_plan.py --bf16     # then: fp32 and bf16 forwards of both files

1. writes random-weight files in the layouts the configs name (docs/diffpure_nets.md):
   score_sde's checkpoint_8.pth ({optimizer, model, ema, step}, `module.` keys, EMA
   shadow_params in parameters() order; DDPM++ deep, 106.6 M parameters), guided-diffusion's
   256x256_diffusion_uncond.pt (plain state dict, 552.8 M parameters), RobustBench's
   WRN-28-10 Standard.pt ({state_dict: module.…}) and a torchvision ResNet-50 state dict;
2. writes random-image shards shaped like the configs' data: CIFAR-10 2 × 256 images of 32 px,
   ImageNet 50 shards × 11 images of 224 px (the config reads 11 per shard);
3. runs `advpure plan` on each config with `--set` pointing at them, batch 1, and the solver
   and attacks cut so that a 2-core CPU finishes in minutes (CUTS below, printed with the plan);
   ImageNet without attacks unless --imagenet-attack (the clean stage: its purification cost).

The plan is a CPU calibration of a reduced process: per-step costs are the real networks'
(random weights cost what trained ones cost), but the solver-step, attack-step and EOT counts
are the cut ones, so its totals are not the published job's. Nothing here measures a GPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the cuts that keep one calibration to minutes on one CPU thread (measured here: DDPM++ deep
# ≈ 0.3 s per 32 px image-evaluation, the 256 px U-Net ≈ 25 s): solver steps via dt, attack
# steps, EOT draws, Square queries and APGD-T target classes via the preset's overrides
CUTS = {
    "cifar10": ["data.batch_size=1", "purifier.params.dt=0.05",   # 2 solver steps instead of 100
                "attacks.0.overrides={steps: 2, eot: 2, n_queries: 2, n_target_classes: 1}"],
    "imagenet": ["data.batch_size=1", "purifier.params.sampler=sde", "purifier.params.dt=0.15",  # 1 step, not 150
                 # no attack: the clean stage alone (one purification per image); with the attack
                 # (--imagenet-attack) the full-gradient graph at 256 px passed 8 GiB on this CPU
                 "attacks=[]", "evaluation.max_rows=1"],
}
# diffpure2022's first entry (APGD-CE, full gradient) at 1 step and 1 draw
IMAGENET_ATTACK = "attacks=[{name: apgd, params: {eps: 0.0156863, steps: 1, loss: ce}, gradient: full, eot: 1}]"


def _save(obj, path: Path) -> str:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return str(path)


def score_sde_checkpoint(path: Path) -> str:
    """checkpoint_8.pth as score_sde's run_lib saves it: DataParallel keys, EMA shadows in order."""
    import torch

    from pipeline.purifiers.nets.ncsnpp import PUBLISHED_CIFAR10, NCSNpp

    if path.exists():   # seeded: a rerun would write the same file
        return str(path)
    torch.manual_seed(0)
    net = NCSNpp(**PUBLISHED_CIFAR10)
    shadow = [p.detach().clone() for p in net.parameters()]
    return _save({"optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]},
                  "model": {f"module.{k}": v for k, v in net.state_dict().items()},
                  "ema": {"decay": 0.9999, "num_updates": 8, "shadow_params": shadow}, "step": 8}, path)


def guided_checkpoint(path: Path) -> str:
    """256x256_diffusion_uncond.pt: guided-diffusion's plain state dict."""
    import torch

    from pipeline.purifiers.nets.guided_unet import PUBLISHED_256_UNCOND, GuidedUNet

    if path.exists():
        return str(path)
    torch.manual_seed(1)
    return _save(GuidedUNet(**PUBLISHED_256_UNCOND).state_dict(), path)


def classifier_checkpoints(folder: Path) -> tuple[str, str]:
    """RobustBench's Standard.pt ({state_dict: module.…}) and a torchvision resnet50 state dict."""
    import torch

    from pipeline.classifiers import resnet, wideresnet

    torch.manual_seed(2)
    wrn = {"state_dict": {f"module.{k}": v for k, v in wideresnet.make_net("robustbench").state_dict().items()}}
    return (_save(wrn, folder / "Standard.pt"),
            _save(resnet.ResNet(50, 1000, "imagenet").state_dict(), folder / "resnet50.pth"))


def random_shards(folder: Path, shards: int, per_shard: int, size: int, classes: int) -> str:
    import numpy as np

    from pipeline.io.shards import ShardWriter

    rng = np.random.default_rng(0)
    writer = ShardWriter(str(folder), samples_per_shard=per_shard)
    for i in range(shards * per_shard):
        writer.write(f"s{i:06d}", rng.integers(0, 256, (size, size, 3), dtype=np.uint8), int(i % classes))
    writer.close()
    return writer.pattern()


def bf16_forwards(models: Path) -> None:
    """Each published network loaded from its file in float32 and in bfloat16 (the purifier's
    `dtype`; inputs and outputs stay float32): one forward of one image, the relative
    difference and the seconds (random weights: a check that bf16 runs, not of accuracy)."""
    import torch

    from pipeline.purifiers.nets.guided_unet import load_guided_diffusion
    from pipeline.purifiers.nets.ncsnpp import load_score_sde

    nets = [("checkpoint_8.pth", load_score_sde, 32, torch.tensor([99.9])),   # label 999·t at t = 0.1
            ("256x256_diffusion_uncond.pt", load_guided_diffusion, 256, torch.tensor([150]))]
    for name, load, size, t in nets:
        path = models / name
        if not path.exists():
            continue
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        out = {}
        for dtype in ("float32", "bfloat16"):
            net, _ = load(str(path), dtype=dtype)
            t0 = time.perf_counter()
            with torch.no_grad():
                out[dtype] = net(x, t)
            print(f"{name} {dtype}: forward of 1 image {time.perf_counter() - t0:.1f} s, "
                  f"output {tuple(out[dtype].shape)} {out[dtype].dtype}", flush=True)
            del net
        ref = out["float32"]
        rel = float((out["bfloat16"] - ref).norm() / ref.norm())
        print(f"{name}: bf16 vs fp32 relative difference {rel:.4f}", flush=True)


def machine_line() -> str:
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load}; "
            f"torch {torch.__version__}, {platform.python_version()}")


def run_plan(config: str, sets: list[str], timeout: float) -> int:
    cmd = [sys.executable, "-m", "pipeline.cli", "plan", config, "--workers", "1", "8"]
    for s in sets:
        cmd += ["--set", s]
    print("$ advpure plan " + " ".join(cmd[4:]), flush=True)
    print(machine_line(), flush=True)
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"(plan did not finish in {timeout:.0f} s)", flush=True)
        rc = 124
    print(f"(plan took {time.perf_counter() - t0:.0f} s, exit {rc}; {machine_line()})\n", flush=True)
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/diffpure_plan", help="where the random checkpoints and shards go")
    ap.add_argument("--only", choices=["cifar10", "imagenet"], help="plan one config only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (cluster.cpus_per_worker)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per plan before it is stopped")
    ap.add_argument("--imagenet-attack", action="store_true",
                    help="plan ImageNet with one APGD-CE step through the purifier (needs > 8 GiB here)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a further config override for every plan, e.g. purifier.params.dtype=bfloat16")
    ap.add_argument("--bf16", action="store_true",
                    help="instead of planning: a float32 and a bfloat16 forward of each network file under --out")
    args = ap.parse_args()
    out = Path(args.out)
    if args.bf16:
        import torch

        torch.set_num_threads(args.threads)
        print(machine_line(), flush=True)
        bf16_forwards(out / "models")
        return 0
    threads = f"cluster.cpus_per_worker={args.threads}"
    rc = 0
    if args.only in (None, "cifar10"):
        ckpt = score_sde_checkpoint(out / "models" / "checkpoint_8.pth")
        wrn, _ = classifier_checkpoints(out / "models")
        data = random_shards(out / "shards" / "cifar10", 2, 256, 32, 10)
        sets = [f"data.shards={data}", f"classifier.params.checkpoint={wrn}", f"purifier.params.checkpoint={ckpt}",
                threads, f"job.output={out / 'runs' / 'cifar10'}", *CUTS["cifar10"]]
        rc |= run_plan("configs/diffpure_cifar10.yaml", sets + args.set, args.timeout)
    if args.only in (None, "imagenet"):
        ckpt = guided_checkpoint(out / "models" / "256x256_diffusion_uncond.pt")
        _, r50 = classifier_checkpoints(out / "models")
        data = random_shards(out / "shards" / "imagenet", 50, 11, 224, 1000)
        sets = [f"data.shards={data}", f"classifier.params.checkpoint={r50}", f"purifier.params.checkpoint={ckpt}",
                threads, f"job.output={out / 'runs' / 'imagenet'}", *CUTS["imagenet"]]
        if args.imagenet_attack:
            sets.append(IMAGENET_ATTACK)
        rc |= run_plan("configs/diffpure_imagenet.yaml", sets + args.set, args.timeout)
    return rc


if __name__ == "__main__":
    sys.exit(main())
