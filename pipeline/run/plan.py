"""`advpure plan CONFIG`: what a job will cost, predicted before it runs.

In-process, no Ray: the worker's protocol is built exactly as a worker builds it
(`build_protocol`), the first shard is read, and each stage of the job — and within it each
attack — runs on one calibration batch of the configured size, timed, with its model
evaluations counted (the records' attack_nfe + purify_nfe, which the commit markers sum as
`nfe`) and its peak memory measured (CUDA: max_memory_allocated; CPU: the process's peak
RSS, reset before each measurement through /proc/self/clear_refs). Per-sample figures are
scaled to the job's sample counts (the shard index), per-shard costs (the first-batch
checks, decoding) to its shard count, and shards are spread over W workers longest-first.

Suggestions: a batch size (memory), a checkpoint segment (full-gradient graphs through an
iterative purifier) and evaluation.max_rows — the rows per purifier and classifier call: what
`auto` picks on this machine (pipeline/evaluation/row_chunks.py, as each worker settles it;
one CPU thread: one 2,000-row call took twice as long as chunks of 250, BENCHMARKS.md "Row
chunks"), compared with a pinned chunk on one whole step.

Start-up: a fresh interpreter importing the worker is timed in a subprocess, plus the
protocol's build; a local Ray start only with `--ray-startup` (it starts Ray). What it cannot
see: a cluster's actor placement, cascade survival beyond the calibration batch, data-
dependent attack costs (early stops) on other shards, and contention on a shared machine.
"""
from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from pipeline import stage_table
from pipeline.config import Config
from pipeline.evaluation import batch, row_chunks, stages
from pipeline.evaluation.protocol import NO_ATTACK, Protocol, build_protocol
from pipeline.io import shards
from pipeline.run import host

log = logging.getLogger(__name__)

DEFAULT_WORKERS = (1, 2, 4, 8)
MEMORY_HEADROOM = 0.8   # suggested batch sizes use at most this share of a worker's memory


# ---------------------------------------------------------------------------- memory

class PeakMemory:
    """Peak memory of one block: device bytes on CUDA, process RSS bytes on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_rss_peak()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak = _rss_peak()


def _reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux ≥ 4.0: resets VmHWM to the current RSS
    except OSError:
        pass  # elsewhere the peak is the process's lifetime peak: an upper bound


def _rss_peak() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _rss_now() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _rss_peak()


def worker_memory(device: torch.device, workers_per_node: int) -> int:
    """Bytes one worker may use: its GPU's memory, or the host's available memory shared
    by the workers on this machine."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.split()}
        return info.get("MemAvailable", info.get("MemFree", 0)) // max(1, workers_per_node)
    except OSError:
        return 0


# ---------------------------------------------------------------------------- calibration

@dataclass
class Measured:
    """One calibrated piece of work on the calibration batch."""
    name: str
    seconds: float           # wall seconds for the whole batch
    samples: int             # samples (rows of the records) it covered
    nfe: int                 # Σ attack_nfe + purify_nfe over its rows
    peak_bytes: int
    fraction: float = 1.0    # share of the job's samples it will run on (cascade survivors)
    per_shard: bool = False  # a cost paid once per shard (checks) rather than per sample


@dataclass
class Calibration:
    build_seconds: float
    decode_seconds_per_sample: float
    baseline_bytes: int
    batch: int
    probe_row: torch.Tensor                                           # [1, C, H, W], the first image
    pieces: dict[str, list[Measured]] = field(default_factory=dict)   # stage → pieces
    sample: stages.Batch | None = None                             # the calibration batch

    @property
    def row_bytes(self) -> int:
        return self.probe_row.numel() * self.probe_row.element_size()


def _measure(p: Protocol, name: str, fn: Callable[[], Any], samples: int) -> tuple[Measured, Any]:
    with PeakMemory(p.device) as mem:
        t0 = time.perf_counter()
        out = fn()
        if p.device.type == "cuda":
            torch.cuda.synchronize(p.device)
        seconds = time.perf_counter() - t0
    rows = out[0] if isinstance(out, tuple) else out
    nfe = 0
    if isinstance(rows, list):
        nfe = sum(int(r.get("attack_nfe") or 0) + int(r.get("purify_nfe") or 0) for r in rows)
    return Measured(name, seconds, samples, nfe, mem.peak), out


def _single_attack(p: Protocol, plan) -> Protocol:
    return dataclasses.replace(p, attacks=[plan])


# a stage's calibration (pipeline.stage_table: Stage.calibrate): (protocol, batch, the images
# of the stage it reads, when calibrated before it) → (measured pieces, its images by output)
Images = dict[Any, torch.Tensor]


def calibrate_evaluate(p: Protocol, b: stages.Batch, inputs: Images | None = None
                       ) -> tuple[list[Measured], Images]:
    """Checks (per shard), the clean evaluation, then each attack on the batch; with a
    cascade each attack is scaled to the share of samples that the earlier attacks of its
    threat model (norm, ε) left unbroken, as the cascade chains them."""
    n = len(b.keys)
    checks, _ = _measure(p, "checks", lambda: ([], stages.first_batch_checks(p, b)), n)
    checks.per_shard = True
    clean, ce = _measure(p, "clean", lambda: batch.clean_eval(p, b.x, b.y, b.keys), n)
    # records count the clean runs in every attack row's purify_nfe (as the markers sum them)
    clean.nfe = 0 if p.attacks else sum(ce.nfe)
    pieces = [checks, clean]
    alive: dict[tuple[str, float], torch.Tensor] = {}   # per threat model: not yet broken
    for plan in p.attacks:
        m, rows = _measure(p, f"attack{plan.index}:{plan.name}",
                           lambda plan=plan: batch.attack_rows(p, plan, b.x, b.y, b.keys, ce), n)
        left = alive.setdefault(stages.threat_model(plan), torch.ones(n, dtype=torch.bool))
        m.fraction = float(left.float().mean()) if p.cascade else 1.0
        if p.cascade:
            left &= torch.tensor([not batch.is_broken(r) for r in rows])
        pieces.append(m)
    return pieces, {}


def calibrate_attack(p: Protocol, b: stages.Batch, inputs: Images | None = None
                     ) -> tuple[list[Measured], Images]:
    """Each attack on the batch; its adversarial images (by attack index) for the purify stage."""
    pieces, images = [], {}
    for plan in p.attacks:
        m, (rows, imgs) = _measure(p, f"attack{plan.index}:{plan.name}",
                                   lambda plan=plan: batch.attack_batch(_single_attack(p, plan), b.x, b.y, b.keys),
                                   len(b.keys))
        pieces.append(m)
        images.update(imgs)
    return pieces, images


def calibrate_purify(p: Protocol, b: stages.Batch, inputs: Images | None = None
                     ) -> tuple[list[Measured], Images]:
    """Purify (R runs) and classify: the adversarial images of an earlier attack stage (one
    set per attack: each source sample is purified once per set) or the shard's own images."""
    x = next(iter(inputs.values())) if inputs else b.x
    infos = [dict(NO_ATTACK)] * len(b.keys)
    m, _ = _measure(p, "purify", lambda: batch.purify_batch(p, x, b.y, b.keys, infos), len(b.keys))
    m.fraction = float(max(1, len(inputs))) if inputs else 1.0
    return [m], {}


def calibrate(cfg: Config, batches: int = 1) -> tuple[Calibration, Protocol]:
    """Build the protocol, read the first shard, run each stage on the calibration batch."""
    host.prepare_compute_process(cfg.cluster.cpus_per_worker)  # as the worker does
    t0 = time.perf_counter()
    p = build_protocol(cfg)
    build = time.perf_counter() - t0
    url = shards.expand(cfg.data.shards)[0]
    t0 = time.perf_counter()
    samples = [s for s in shards.read_shard(url)[: cfg.data.max_samples_per_shard] if s.error is None]
    decode = (time.perf_counter() - t0) / max(1, len(samples))
    if not samples:
        raise ValueError(f"{url}: no decodable samples to calibrate on")
    first = next(stages.batches(samples[: p.batch_size * batches], p.batch_size * batches, p.device))
    _warm_up(p, first)
    row_chunks.settle(p, first.x, first.y, first.keys)   # as the worker does: the stages run at the chunk in force
    base = _rss_now() if p.device.type != "cuda" else int(torch.cuda.memory_allocated(p.device))
    cal = Calibration(build, decode, base, len(first.keys), first.x[:1].detach().cpu(), sample=first)
    images: dict[str, Images] = {}   # each calibrated stage's images, for a stage that reads them
    for name in cfg.job.stages:
        stage = stage_table.get(name)
        if stage.calibrate is None:
            log.warning("stage %s has no calibration: the plan predicts no time for it", name)
            continue
        hook = stage_table.load(stage.calibrate)
        cal.pieces[name], images[name] = hook(p, first, images.get(stage.reads) if stage.reads else None)
    return cal, p


def _warm_up(p: Protocol, b: stages.Batch) -> None:
    """One small clean evaluation first: one-time costs (allocator, kernels) are not per sample."""
    k = min(2, len(b.keys))
    batch.clean_eval(p, b.x[:k], b.y[:k], b.keys[:k])


# ---------------------------------------------------------------------------- prediction

def _job_shards(cfg: Config, fallback: int) -> list[int]:
    """Samples per shard (index counts, capped by max_samples_per_shard; unknown → fallback)."""
    urls = shards.expand(cfg.data.shards)
    counts = shards.expected_counts(urls, cfg.data.index)
    cap = cfg.data.max_samples_per_shard
    return [min(c if c is not None else fallback, cap or 10**12) for c in (counts[u] for u in urls)]


def _shard_seconds(cal: Calibration, n: int) -> dict[str, float]:
    """Predicted seconds per stage for one shard of n samples."""
    out = {}
    for stage, pieces in cal.pieces.items():
        total = n * cal.decode_seconds_per_sample
        for m in pieces:
            total += m.seconds if m.per_shard else m.seconds / m.samples * n * m.fraction
        out[stage] = total
    return out


def makespan(durations: Sequence[float], workers: int) -> float:
    """Longest-first list scheduling of shard durations on `workers` (the driver's queue)."""
    loads = [0.0] * max(1, workers)
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + d)
    return max(loads)


def _local_parallelism(cfg: Config) -> int | None:
    """Workers that can run at once on this machine's CPUs (private local Ray on CPU)."""
    if cfg.cluster.address not in (None, "", "local") or os.environ.get("RAY_ADDRESS"):
        return None
    return max(1, int((os.cpu_count() or 1) // max(1e-9, cfg.cluster.cpus_per_worker)))


def _stage_rows(cal: Calibration, counts: list[int]) -> list[dict[str, Any]]:
    total = sum(counts)
    rows = []
    for stage, pieces in cal.pieces.items():
        for m in pieces:
            runs_on = len(counts) if m.per_shard else total * m.fraction
            scale = 1.0 if m.per_shard else 1.0 / m.samples
            rows.append({"stage": stage, "piece": m.name, "samples": runs_on,
                         "seconds": m.seconds * scale * runs_on, "evaluations": m.nfe * scale * runs_on,
                         "seconds_per_sample": None if m.per_shard else m.seconds / m.samples,
                         "peak_bytes": m.peak_bytes})
    return rows


def batch_size_limit(cal: Calibration, budget: int) -> tuple[int | None, float]:
    """(the most samples per batch whose predicted peak — baseline + the per-sample growth
    measured on the calibration batch, scaled linearly — fits MEMORY_HEADROOM of the
    worker's memory, or None when nothing fits; that per-sample growth in bytes)."""
    peak = max((m.peak_bytes for ps in cal.pieces.values() for m in ps), default=0)
    per_sample = max(1.0, (peak - cal.baseline_bytes) / max(1, cal.batch))
    room = MEMORY_HEADROOM * budget - cal.baseline_bytes
    if budget <= 0 or room <= 0:
        return None, per_sample
    return int(room // per_sample), per_sample


def suggest_batch_size(cal: Calibration, budget: int, shard_size: int) -> int | None:
    """Largest power of two within batch_size_limit, or the whole shard when that fits (a
    batch never spans shards, so more than a shard buys nothing)."""
    fit, _ = batch_size_limit(cal, budget)
    if fit is None:
        return None
    return shard_size if fit >= shard_size else max(1, 2 ** int(math.log2(max(1, fit))))


def suggest_segment(p: Protocol, cal: Calibration, budget: int) -> dict[str, Any] | None:
    """checkpoint_segment for full-gradient attacks through an iterative purifier: 0 (no
    recomputation) while the whole graph fits a quarter of the worker's memory, else −1."""
    pur = p.defense.purifier
    k = int(getattr(pur.settings, _steps_field(pur), 0) or 0)
    full = [a for a in p.attacks if a.gradient == "full"]
    if not hasattr(pur.settings, "checkpoint_segment") or not full or k <= 0:
        return None
    per_row_step = _graph_bytes_per_row_step(pur, p.device, cal)
    rows = cal.batch * max(a.eot for a in full)
    whole = rows * k * per_row_step
    auto = rows * 2.0 * math.sqrt(k * cal.row_bytes * per_row_step)  # (K/s)·state + s·step at the optimum s
    suggestion = 0 if budget and whole <= 0.25 * budget else -1
    return {"steps": k, "rows": rows, "graph_bytes_no_checkpoint": whole, "graph_bytes_auto": auto,
            "suggested": suggestion, "configured": int(pur.settings.checkpoint_segment)}


def _steps_field(pur) -> str:
    """The setting that counts an iterative purifier's steps."""
    return "steps" if hasattr(pur.settings, "steps") else "max_iter"


CHUNK_GAIN = 0.9   # auto over a pinned chunk only if ≥ 10 % faster: single timings on a shared CPU move that much


def suggest_max_rows(p: Protocol, cal: Calibration) -> dict[str, Any] | None:
    """evaluation.max_rows by measurement: what `auto` picks on this machine (row_chunks.choose,
    as each worker does: settled in `calibrate` when auto is configured, else run here). A
    pinned chunk is compared with it on one full step of the dominant work (row_chunks.
    protocol_timer) and auto is suggested where it is faster by 1 − CHUNK_GAIN."""
    if cal.sample is None:
        return None
    b = cal.sample
    timer, draws, workload = row_chunks.protocol_timer(p, b.x, b.y, b.keys)
    needed = p.batch_size * max(draws, p.runs)
    if p.max_rows == row_chunks.AUTO and p.rows_choice is not None:
        return {"configured": "auto", "auto": p.rows_choice.record(), "suggested": "auto", "seconds": {}}
    auto = row_chunks.choose(p.device, needed, timer, workload)
    pinned = min(int(p.max_rows), len(b.keys) * draws)
    seconds = {n: timer(n, True)[0] for n in sorted({pinned, auto.rows})}
    better = seconds[auto.rows] < CHUNK_GAIN * seconds[pinned]
    return {"configured": int(p.max_rows), "auto": auto.record(), "suggested": "auto" if better else int(p.max_rows),
            "seconds": seconds}


def _max_rows_line(mr: dict[str, Any]) -> str:
    a = mr["auto"]
    picks = f"auto picks {a['rows']} on this machine ({a['how']}: {a['detail']}; {a['workload']}, " \
            f"{a['needed']} rows a call)"
    if mr["configured"] == "auto":
        return f"max_rows: {picks}"
    timed = ", ".join(f"{n} rows {s:.2f} s" for n, s in mr["seconds"].items())
    return (f"max_rows: configured {mr['configured']}, suggested {mr['suggested']}; {picks}; "
            f"one whole step: {timed}")


def _graph_bytes_per_row_step(pur, device: torch.device, cal: Calibration) -> float:
    """Graph bytes one row and one step keep for backward, measured on a 2-step run."""
    from pipeline.purifiers import steps as steps_mod
    from pipeline.seeding import Noise

    old = pur.settings
    x = cal.probe_row.clone().to(device).requires_grad_(True)
    try:
        pur.settings = old.replace({_steps_field(pur): 2, "checkpoint_segment": 0})
        meter = steps_mod.SavedBytes(1)
        with meter:
            pur.purify(x, Noise.for_batch(0, ["plan-probe"], "plan"))
    finally:
        pur.settings = old
    return meter.total / 2.0


def import_seconds() -> float:
    """Wall seconds a fresh interpreter takes to import the worker (what each actor pays
    before building its models), measured in a subprocess."""
    import subprocess
    import sys

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pipeline.run.worker"], check=True, capture_output=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return time.perf_counter() - t0


def ray_startup_seconds() -> float:
    """Wall seconds to start (and stop) a private local Ray, measured in a subprocess — what
    `advpure run` pays first on a machine without a cluster. Opt-in: it starts Ray."""
    import subprocess
    import sys

    code = ("import time, ray; t = time.perf_counter(); ray.init(address='local', include_dashboard=False, "
            "logging_level='ERROR'); print(time.perf_counter() - t); ray.shutdown()")
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def plan(cfg: Config, workers: Sequence[int] | None = None, calibration_batches: int = 1,
         ray_startup: bool = False) -> dict[str, Any]:
    """Calibrate, then predict the whole job: evaluations, seconds and peak memory per stage
    and piece, wall time per worker count, a batch size and a checkpoint segment. With
    ray_startup, a local Ray start is measured and added to the wall times."""
    cal, p = calibrate(cfg, calibration_batches)
    ray_s = ray_startup_seconds() if ray_startup else 0.0
    startup = ray_s + import_seconds() + cal.build_seconds
    counts = _job_shards(cfg, fallback=cal.batch)
    rows = _stage_rows(cal, counts)
    per_shard = [sum(_shard_seconds(cal, n).values()) for n in counts]
    local = _local_parallelism(cfg)
    wanted = sorted(set(workers or DEFAULT_WORKERS) | ({cfg.cluster.num_workers} - {"auto"}))
    per_workers = []
    for w in wanted:
        parallel = min(w, local) if local else w
        per_workers.append({"workers": w, "parallel": parallel, "seconds": startup + makespan(per_shard, parallel)})
    nodes_workers = int(cfg.cluster.num_workers) if cfg.cluster.num_workers != "auto" else 1
    budget = worker_memory(p.device, nodes_workers if p.device.type != "cuda" else 1)
    peak = max((m.peak_bytes for ps in cal.pieces.values() for m in ps), default=0)
    limit, per_sample = batch_size_limit(cal, budget)
    return {
        "config": cfg.source, "device": str(p.device), "threads": torch.get_num_threads(),
        "shards": len(counts), "samples": sum(counts), "calibration_batch": cal.batch,
        "build_seconds": cal.build_seconds, "decode_seconds_per_sample": cal.decode_seconds_per_sample,
        "stages": rows,
        "evaluations": sum(r["evaluations"] for r in rows),
        "startup_seconds": startup, "ray_startup_seconds": ray_s if ray_startup else None,
        "seconds_one_worker": startup + sum(per_shard),
        "per_shard_seconds": per_shard,
        "per_workers": per_workers, "local_parallelism": local,
        "peak_bytes": peak, "baseline_bytes": cal.baseline_bytes, "worker_memory_bytes": budget,
        "batch_size": {"configured": cfg.data.batch_size, "memory_limit": limit, "bytes_per_sample": per_sample,
                       "shard_size": max(counts, default=cal.batch),
                       "suggested": suggest_batch_size(cal, budget, max(counts, default=cal.batch))},
        "checkpoint_segment": suggest_segment(p, cal, budget),
        "max_rows": suggest_max_rows(p, cal),
        # the networks' memory format the workers settle with the chunk (evaluation/memory_format.py)
        "channels_last": p.rows_choice.layout if p.rows_choice is not None else None,
    }


def _mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f} MiB"


def _dur(s: float) -> str:
    return f"{s:,.1f} s" if s < 120 else f"{s / 60:,.1f} min" if s < 7200 else f"{s / 3600:,.1f} h"


def _batch_line(r: dict[str, Any]) -> str:
    """The suggestion with its reason: the memory bound, and whether the shard caps it."""
    b = r["batch_size"]
    memory = (f"{b['bytes_per_sample'] / 2**20:.2f} MiB per sample over a {_mib(r['baseline_bytes'])} baseline, "
              f"{100 * MEMORY_HEADROOM:.0f} % of {_mib(r['worker_memory_bytes'])} worker memory")
    if b["suggested"] is None:
        return f"batch size: configured {b['configured']}, no suggestion (the baseline alone does not fit: {memory})"
    if b["suggested"] == b["shard_size"] and (b["memory_limit"] or 0) >= b["shard_size"]:
        why = (f"the whole shard of {b['shard_size']}: a batch never spans shards; memory would allow "
               f"~{b['memory_limit']:,} ({memory})")
    else:
        why = f"the largest power of two within the ~{b['memory_limit']:,} that memory allows ({memory})"
    return f"batch size: configured {b['configured']}, suggested {b['suggested']} = {why}"


def format_plan(r: dict[str, Any]) -> str:
    """The plan as text: per piece, per worker count, suggestions."""
    lines = [f"plan for {r['config']}: {r['samples']} samples in {r['shards']} shards on {r['device']} "
             f"({r['threads']} thread(s) per worker), calibrated on a batch of {r['calibration_batch']}",
             f"{'stage':9s} {'piece':22s} {'samples':>9s} {'s/sample':>9s} {'evaluations':>13s} {'time':>10s} "
             f"{'peak mem':>10s}"]
    for row in r["stages"]:
        sps = "per shard" if row["seconds_per_sample"] is None else f"{row['seconds_per_sample']:.4f}"
        lines.append(f"{row['stage']:9s} {row['piece']:22s} {row['samples']:9.0f} {sps:>9s} "
                     f"{row['evaluations']:13,.0f} {_dur(row['seconds']):>10s} {_mib(row['peak_bytes']):>10s}")
    lines.append(f"total: {r['evaluations']:,.0f} model evaluations (records' attack_nfe + purify_nfe), "
                 f"{_dur(r['seconds_one_worker'])} on one worker (start-up {r['startup_seconds']:.1f} s, "
                 f"decode {r['decode_seconds_per_sample'] * 1e3:.2f} ms/sample), peak {_mib(r['peak_bytes'])}")
    for w in r["per_workers"]:
        note = f" (this machine runs {w['parallel']} at once)" if w["parallel"] != w["workers"] else ""
        lines.append(f"  {w['workers']:3d} worker(s): {_dur(w['seconds'])}{note}")
    ray = r.get("ray_startup_seconds")
    lines.append(f"  (includes a measured local Ray start of {ray:.1f} s)" if ray is not None else
                 "  (Ray start-up not included: --ray-startup measures a local one)")
    lines.append(_batch_line(r))
    if r.get("max_rows"):
        lines.append(_max_rows_line(r["max_rows"]))
    if r.get("channels_last"):
        cl = r["channels_last"]
        lines.append(f"channels_last: {'channels-last' if cl['channels_last'] else 'contiguous'} "
                     f"({cl['how']}: {cl['detail']})")
    seg = r["checkpoint_segment"]
    if seg:
        lines.append(f"checkpoint_segment: configured {seg['configured']}, suggested {seg['suggested']} "
                     f"(full-gradient graph through {seg['steps']} steps × {seg['rows']} rows: "
                     f"{_mib(seg['graph_bytes_no_checkpoint'])} without, ~{_mib(seg['graph_bytes_auto'])} with -1)")
    return "\n".join(lines)
