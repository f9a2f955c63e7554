"""evaluation.max_rows — the rows per purifier and classifier call — chosen by measurement.

A batch of B images × R draws (EOT or R runs) is pushed through purifier and classifier as
[B·R, ...] rows, in calls of at most max_rows rows. On one CPU thread a 2,000-row forward and
backward runs at half the speed of chunks of 250 (BENCHMARKS.md "Row chunks": cache-sized
calls win), while a GPU wants the largest call that fits. An attack's EOT gradient step runs
forward and backward per chunk of max_rows // EOT samples (`pipeline.attacks.base.eot_step`),
and the calibration times that path. Results do not depend on the chunk: draws are keyed per
row (pipeline.seeding).

`max_rows: auto` (the default) settles the chunk once per worker, on the first batch it
computes (`settle`, called by the stages' batch loop), and keeps it for the job:
- CPU: one step of the work that dominates — an EOT gradient step of the attack with the most
  draws, else the R-run forward — timed at each power of two in ROW_CHUNKS below the rows a
  call needs (and at those rows: one call); the fastest per row wins, ties (within TIE) go to
  the larger chunk. Each candidate runs on about its own number of rows, smallest first, and
  the sweep stops before its predicted cost passes CPU_BUDGET_S, or once two candidates in a
  row are slower than the best (past the optimum). A probe on one sample comes first: rows so
  heavy that the two smallest chunks would not fit the budget are not timed at all (the
  smallest chunk), so a small job does not spend a tenth of its time choosing.
- CUDA: the largest candidate whose step fits in memory (tried largest first; out of memory
  → the next smaller): larger calls only fill the device better, no timing needed.
Rows a call needs ≤ the smallest candidate: one call, nothing timed. An int pins the chunk.
The choice (rows, how, why, timings) is logged and written into every commit marker.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from pipeline.attacks.base import Goal, eot_step
from pipeline.evaluation import memory_format
from pipeline.seeding import Noise

if TYPE_CHECKING:
    from pipeline.evaluation.defense import Defense
    from pipeline.evaluation.protocol import PlannedAttack, Protocol

log = logging.getLogger(__name__)

AUTO = "auto"
ROW_CHUNKS = (64, 128, 256, 512, 1024, 2048, 4096)
UNSETTLED_ROWS = 4096   # a Defense's chunk before `settle` (code that builds one without a batch loop)
CPU_BUDGET_S = 4.0      # the CPU sweep stops before its predicted cost passes this
TIE = 0.05              # per-row times within 5 % of the fastest are ties: the larger chunk wins
CONTEXT = "max_rows/calibration"   # the draws' context: calibration never shares a job's draws

# one timed run at a chunk: (chunk, whole batch?) → (seconds, rows it ran)
Timer = Callable[[int, bool], "tuple[float, int]"]


@dataclass(frozen=True)
class Choice:
    """The chunk a worker uses, and why."""
    rows: int                        # evaluation.max_rows in force
    how: str                         # configured | one_call | timed | budget | largest_fit
    needed: int                      # rows of the largest call: batch × max(EOT, R)
    detail: str                      # the reason, in words
    workload: str = ""               # what was timed
    seconds_per_row: dict[int, float] = field(default_factory=dict)   # chunk → s/row (CPU sweep)
    seconds: float = 0.0             # what settling cost
    layout: dict[str, Any] | None = None   # the networks' memory format (memory_format.LayoutChoice.record)

    def record(self) -> dict[str, Any]:
        """JSON-able, for the commit marker."""
        return {"rows": self.rows, "how": self.how, "needed": self.needed, "detail": self.detail,
                "workload": self.workload, "seconds": round(self.seconds, 3),
                "seconds_per_row": {str(k): v for k, v in self.seconds_per_row.items()},
                "channels_last": self.layout}


def initial_rows(requested: int | str) -> int:
    """A Defense's chunk at build time: the pinned value, or UNSETTLED_ROWS until `settle`."""
    return UNSETTLED_ROWS if requested == AUTO else max(1, int(requested))


def candidates(needed: int) -> list[int]:
    """Powers of two in ROW_CHUNKS below `needed`, and `needed` itself (capped at the largest)."""
    return sorted({c for c in ROW_CHUNKS if c < needed} | {min(needed, ROW_CHUNKS[-1])})


def fastest(seconds_per_row: dict[int, float], tie: float = TIE) -> int:
    """The chunk with the least seconds per row; among those within `tie` of it, the largest."""
    best = min(seconds_per_row.values())
    return max(c for c, s in seconds_per_row.items() if s <= best * (1.0 + tie))


def sweep(timer: Timer, chunks: Sequence[int], budget_s: float = CPU_BUDGET_S) -> tuple[dict[int, float], float]:
    """Seconds per row at each chunk, smallest first. First a probe on one sample, twice (the
    first call pays one-time costs): if it predicts that the two smallest chunks cannot both be
    timed within the budget, nothing is timed — on rows that heavy (a long Langevin chain per
    row) timing would cost more of a small job than a better chunk saves. Otherwise one
    warm-up run at the smallest chunk, then the sweep, which stops before the predicted cost
    (the chunk's rows × the best per-row time so far) passes the budget, and after two chunks
    in a row slower than the best by more than TIE. Returns (chunk → seconds per row, seconds spent)."""
    spent = timer(1, False)[0]
    s, n = timer(1, False)
    spent += s
    if len(chunks) > 1 and spent + sum(chunks[:2]) * s / max(1, n) > budget_s:
        return {}, spent
    s, n = timer(chunks[0], False)
    spent, warm, per_row, worse = spent + s, s / max(1, n), {}, 0
    for c in chunks:
        if spent + c * min(per_row.values(), default=warm) > budget_s:
            break
        s, n = timer(c, False)
        spent += s
        per_row[c] = s / max(1, n)
        worse = worse + 1 if per_row[c] > min(per_row.values()) * (1.0 + TIE) else 0
        if worse == 2:
            break
    return per_row, spent


def choose(device: torch.device, needed: int, timer: Timer, workload: str,
           is_oom: Callable[[BaseException], bool] | None = None) -> Choice:
    """The chunk for calls of up to `needed` rows on `device` (see the module docstring)."""
    chunks = candidates(needed)
    t0 = time.perf_counter()
    if needed <= ROW_CHUNKS[0]:
        return Choice(needed, "one_call", needed, f"a call needs {needed} rows ≤ {ROW_CHUNKS[0]}: one call, "
                      "nothing timed", workload)
    if device.type == "cuda":
        return _largest_fit(chunks, needed, timer, workload, is_oom or is_out_of_memory, t0)
    per_row, spent = sweep(timer, chunks)
    if not per_row:   # the probe (or the warm-up) said timing would pass the budget
        return Choice(chunks[0], "budget", needed, f"timing the chunks would pass the {CPU_BUDGET_S:g} s "
                      f"calibration budget (probe and warm-up {spent:.1f} s): rows this heavy are not timed; "
                      f"the smallest chunk, {chunks[0]}", workload, {}, time.perf_counter() - t0)
    rows = fastest(per_row)
    timed = ", ".join(f"{c}: {1e3 * s:.2f}" for c, s in per_row.items())
    left = [c for c in chunks if c not in per_row]
    note = f"; not timed: {left} (budget {CPU_BUDGET_S:g} s or past the optimum)" if left else ""
    return Choice(rows, "timed", needed, f"fastest per row on this CPU (ms/row {timed}; ties within "
                  f"{100 * TIE:.0f} % → larger){note}", workload, per_row, time.perf_counter() - t0)


def _largest_fit(chunks: Sequence[int], needed: int, timer: Timer, workload: str,
                 is_oom: Callable[[BaseException], bool], t0: float) -> Choice:
    for c in sorted(chunks, reverse=True):
        try:
            s, n = timer(c, True)
        except RuntimeError as err:
            if not is_oom(err):
                raise
            torch.cuda.empty_cache()
            continue
        return Choice(c, "largest_fit", needed, f"GPU: the largest chunk whose step fits in memory ({n} rows in "
                      f"{s:.3f} s); larger calls only fill the device better", workload, {},
                      time.perf_counter() - t0)
    return Choice(chunks[0], "largest_fit", needed, f"GPU: no chunk fit one step of the whole batch; the "
                  f"smallest, {chunks[0]} (the batch loop halves the batch on out of memory)", workload, {},
                  time.perf_counter() - t0)


def is_out_of_memory(err: BaseException) -> bool:
    """A device (torch.cuda.OutOfMemoryError) or host allocation failure."""
    text = str(err).lower()
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


# ---------------------------------------------------------------------------- the protocol's work

def time_eot_step(p: Protocol, attack: PlannedAttack, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str],
                  max_rows: int) -> float:
    """Seconds of one attack step's gradient on images x — `attack.eot` draws per image through
    the defense the attack differentiates, the path attacks take (`eot_step`: forward and
    backward per chunk of samples, cross-entropy, the attack's EOT reduction) — with max_rows
    rows per purifier and classifier call (restored afterwards)."""
    defense = attack.surrogate or p.defense
    old = defense.max_rows
    defense.max_rows = max(1, int(max_rows))
    try:
        target = defense.attack_target(attack.gradient, p.seed, keys, CONTEXT, attack.eot)
        reduction = getattr(attack.attack, "eot_reduction", "mean_loss")
        t0 = time.perf_counter()
        eot_step(target, x, Goal(y, None, False), 0, "ce", reduction)
        _sync(p.device)
        return time.perf_counter() - t0
    finally:
        defense.max_rows = old


def time_forward(p: Protocol, x: torch.Tensor, keys: Sequence[str], max_rows: int) -> float:
    """Seconds of the R-run forward (purify R times, classify) of images x at max_rows."""
    old = p.defense.max_rows
    p.defense.max_rows = max(1, int(max_rows))
    try:
        noise = Noise.for_batch(p.seed, keys, CONTEXT, p.runs, x.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            p.defense.logits(x, noise, "full")
        _sync(p.device)
        return time.perf_counter() - t0
    finally:
        p.defense.max_rows = old


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def protocol_timer(p: Protocol, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str]
                   ) -> tuple[Timer, int, str]:
    """(timer, rows per sample of one call, what it times) for the protocol's dominant work:
    the EOT gradient step of the attack with the most draws, or the R-run forward. A timer at
    chunk c runs on about c rows (c // draws images, at least one), or on the whole batch."""
    grad = [a for a in p.attacks if a.gradient != "classifier"]
    attack = max(grad, key=lambda a: a.eot) if grad else None
    draws = attack.eot if attack is not None else p.runs
    name = (f"one EOT-{attack.eot} gradient step of attack{attack.index}:{attack.name}" if attack
            else f"the {p.runs}-run forward")

    def timer(c: int, whole: bool) -> tuple[float, int]:
        n = len(keys) if whole else max(1, min(len(keys), c // draws))
        if attack is not None:
            return time_eot_step(p, attack, x[:n], y[:n], keys[:n], c), n * draws
        return time_forward(p, x[:n], keys[:n], c), n * draws
    return timer, draws, name


def defenses(p: Protocol) -> list[Defense]:
    """Every Defense of the protocol whose calls the chunk governs (the real one, surrogates)."""
    return [p.defense] + [a.surrogate for a in p.attacks if a.surrogate is not None]


def settle(p: Protocol, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str]) -> Choice:
    """The protocol's chunk, chosen once (on the first batch it computes) and applied to
    every defense, then the networks' memory format at that chunk (memory_format.settle);
    later calls return the same choice."""
    if p.rows_choice is not None:
        return p.rows_choice
    timer, draws, workload = protocol_timer(p, x, y, keys)
    needed = p.batch_size * max(draws, p.runs)
    if p.max_rows != AUTO:
        choice = Choice(int(p.max_rows), "configured", needed, "evaluation.max_rows pinned in the config")
    else:
        choice = choose(p.device, needed, timer, workload)
    every = defenses(p)
    for d in every:
        d.max_rows = choice.rows
    log.info("evaluation.max_rows %s on %s: %d rows per call (%s; %s) — settled in %.2f s", p.max_rows,
             p.device, choice.rows, choice.how, choice.detail, choice.seconds)
    layout = memory_format.settle(p.channels_last, every, p.device, timer, draws, choice.rows, converted=True)
    p.rows_choice = dataclasses.replace(choice, layout=layout.record())
    return p.rows_choice
