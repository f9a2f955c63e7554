"""evaluation.channels_last: auto — the networks' memory format, chosen by measurement.

On the project's 2-core CPU (one thread, oneDNN), a forward and input-gradient backward
through the small MNIST CNN, the Hill script's WRN-10-2 and its EBM runs 15–25 % faster per
row with the convolution weights in channels-last format (BENCHMARKS.md "The networks'
memory format"); a network of other layers may gain nothing or lose. `auto` (the default)
decides per network, once per worker, right after `row_chunks.settle` has chosen the chunk:
one sample's dominant step runs once to capture each network's first call (its arguments,
and whether it ran with gradients), then that call is timed at the chunk's rows — forward,
and the gradient to its image input where the step needs one — contiguous and channels-last
in turn, within BUDGET_S for all networks. A network goes channels-last only if each of its
timed runs beats each contiguous one by MARGIN. Timing the networks alone keeps the cost
independent of the protocol (a Langevin chain of 50 steps × EOT 8 per row would make timing
whole steps cost seconds). `true` is the GPU path's FastNet (inputs converted too); `false`
never converts.

Only the weights are converted, in place: the convolution kernels then run channels-last.
Hooks keep every tensor outside the networks in the default format — a network's output is
made contiguous, and so is the gradient leaving through its input — so the attacks' and
purifiers' own arithmetic (views, noise, projections) never meets another layout. Results
equal the contiguous ones to float32 rounding (the kernels sum in another order), which is
why, like max_rows, the choice is recorded in every commit marker but is not part of the
config hash. A network that cannot run channels-last makes its timing fail: the error is
recorded and that network stays contiguous.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.evaluation.defense import Defense
    from pipeline.evaluation.row_chunks import Timer

log = logging.getLogger(__name__)

AUTO = "auto"
# `auto` resolved without timing, for every job this process (and its workers) runs: "false"
# keeps the networks contiguous. Timings differ between workers, and so can their choices, which
# changes records in the last float32 bits; a test that compares two runs' records bit for bit,
# or a user who wants every worker alike without editing configs, sets this (tests/conftest.py does).
ENV = "ADVPURE_CHANNELS_LAST"
MARGIN = 0.08         # a network goes channels-last only if each timed run beats each contiguous one by this
BUDGET_S = 1.0        # the timed runs of all networks together (rows cut to fit)
MIN_RUN_S = 0.02      # a timed run repeats the call until it lasts about this
MAX_REPS = 20
RUNS = ("contiguous", "channels_last") * 3   # the first pair warms each format up, the other two are compared


@dataclass(frozen=True)
class LayoutChoice:
    """The networks' memory format on this worker, and why."""
    channels_last: bool         # any network converted
    how: str                    # configured | environment | timed | no_network
    detail: str
    networks: tuple[dict[str, Any], ...] = ()   # per network: name, channels_last, how, seconds per call
    spent: float = 0.0

    def record(self) -> dict[str, Any]:
        return {"channels_last": self.channels_last, "how": self.how, "detail": self.detail,
                "networks": list(self.networks), "spent": round(self.spent, 3)}


@dataclass
class Call:
    """A network's first call in the probe: its arguments (detached copies), whether a
    gradient flowed to its image argument (the first floating 4-D tensor), which the timing
    then differentiates with respect to, and its rows."""
    args: list[Any]
    kwargs: dict[str, Any]
    grad: bool
    image: int
    rows: int


def networks(defenses: Sequence[Defense]) -> list[nn.Module]:
    """The defenses' classifiers and purifier networks with convolution weights, once each;
    not a test-time optimisation purifier's (it builds and trains its own per image) nor a
    torch.compile'd one (its graph was traced for the format it had)."""
    found: dict[int, nn.Module] = {}
    for d in defenses:
        found.setdefault(id(d.classifier), d.classifier)
        if not d.purifier.test_time_optimization:
            for _, child in d.purifier.named_children():
                found.setdefault(id(child), child)
    return [m for m in found.values()
            if getattr(m, "compiled", None) is None and any(q.dim() == 4 for q in m.parameters())]


class ChannelsLast:
    """Switches networks' 4-D weights to channels-last in place, with the boundary hooks;
    `undo` restores the contiguous format and removes the hooks."""

    def __init__(self, nets: list[nn.Module]):
        self.nets, self.handles = nets, []
        for net in nets:
            net.to(memory_format=torch.channels_last)
            self.handles += [net.register_forward_pre_hook(_gradient_leaves_contiguous),
                             net.register_forward_hook(_output_contiguous)]

    def undo(self) -> None:
        for h in self.handles:
            h.remove()
        for net in self.nets:
            net.to(memory_format=torch.contiguous_format)
        self.handles = []


def _gradient_leaves_contiguous(module: nn.Module, args: tuple) -> tuple:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() == 4 and a.requires_grad and torch.is_grad_enabled():
            a = a.view_as(a)               # a hook on the caller's tensor would stay on it
            a.register_hook(lambda g: g.contiguous())
        out.append(a)
    return tuple(out)


def _output_contiguous(module: nn.Module, args: tuple, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.dim() == 4:
        return output.contiguous()
    return output


def capture(nets: list[nn.Module], probe: Callable[[], Any]) -> dict[int, Call]:
    """Run `probe` (one sample's dominant step) and keep each network's first call."""
    calls: dict[int, Call] = {}

    def hook(net: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(net) in calls:
            return
        image = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() == 4
                      and a.is_floating_point()), None)
        if image is not None:
            keep = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            grad = torch.is_grad_enabled() and args[image].requires_grad
            calls[id(net)] = Call(keep, dict(kwargs), grad, image, args[image].shape[0])
    handles = [net.register_forward_pre_hook(hook, with_kwargs=True) for net in nets]
    try:
        probe()
    finally:
        for h in handles:
            h.remove()
    return calls


def _rows_of(call: Call, rows: int) -> tuple[list[Any], dict[str, Any]]:
    """The call's arguments at `rows` rows: every tensor whose first dimension is the call's
    rows is repeated (or cut) to `rows`."""
    def resize(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == call.rows and rows != call.rows:
            reps = -(-rows // call.rows)
            return a.repeat(reps, *[1] * (a.dim() - 1))[:rows]
        return a
    return [resize(a) for a in call.args], {k: resize(v) for k, v in call.kwargs.items()}


def _seconds(net: nn.Module, call: Call, args: list[Any], kwargs: dict[str, Any], reps: int, sync: Callable[[], None]
             ) -> float:
    """Seconds of `reps` calls — forward, and the gradient to the image where the probe's call had gradients."""
    t0 = time.perf_counter()
    for _ in range(reps):
        a = list(args)
        if call.grad:
            a[call.image] = args[call.image].detach().requires_grad_(True)
        with torch.set_grad_enabled(call.grad):
            out = net(*a, **kwargs)
            out = out if isinstance(out, torch.Tensor) else next(o for o in out if isinstance(o, torch.Tensor))
            if call.grad:
                torch.autograd.grad(out.float().sum(), a[call.image])
    sync()
    return time.perf_counter() - t0


def time_network(net: nn.Module, call: Call, rows: int, budget_s: float, sync: Callable[[], None] = lambda: None
                 ) -> tuple[list[float], list[float], int]:
    """(contiguous seconds, channels-last seconds: the two compared runs of each, per call; rows
    timed). RUNS in turn, each of enough calls to last MIN_RUN_S; rows cut to fit `budget_s`."""
    args, kwargs = _rows_of(call, rows)
    one = _seconds(net, call, args, kwargs, 1, sync)            # warm-up, contiguous
    if len(RUNS) * one > budget_s and rows > call.rows:         # cut the rows to fit the budget
        rows = max(call.rows, int(rows * budget_s / (len(RUNS) * one)))
        args, kwargs = _rows_of(call, rows)
        one = _seconds(net, call, args, kwargs, 1, sync)
    reps = max(1, min(MAX_REPS, math.ceil(MIN_RUN_S / max(one, 1e-6))))
    seconds: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
    switch = None
    try:
        for i, fmt in enumerate(RUNS):
            if fmt == "channels_last" and switch is None:
                switch = ChannelsLast([net])
            elif fmt == "contiguous" and switch is not None:
                switch.undo()
                switch = None
            s = _seconds(net, call, args, kwargs, reps, sync) / reps
            if i >= 2:
                seconds[fmt].append(s)
    finally:
        if switch is not None:
            switch.undo()
    return seconds["contiguous"], seconds["channels_last"], rows


def choose(nets: list[nn.Module], probe: Callable[[], Any], rows: int, budget_s: float = BUDGET_S,
           sync: Callable[[], None] = lambda: None) -> tuple[LayoutChoice, ChannelsLast | None]:
    """Each network's format: its first call in `probe` (one sample's dominant step) is timed
    at `rows` rows (the chunk), contiguous and channels-last (`time_network`), and the network
    goes channels-last only if each of its compared runs beats each contiguous one by MARGIN.
    Returns the choice and the switch in force (None: every network contiguous)."""
    t0 = time.perf_counter()
    if not nets:
        return LayoutChoice(False, "no_network", "no network with convolution weights"), None
    calls = capture(nets, probe)
    per_net, chosen = [], []
    for net in nets:
        name = type(getattr(net, "net", net)).__name__
        call = calls.get(id(net))
        if call is None:
            per_net.append({"network": name, "channels_last": False, "how": "not called"})
            continue
        try:
            cont, cl, timed_rows = time_network(net, call, rows, budget_s / len(nets), sync)
        except RuntimeError as err:   # e.g. a .view on a weight that channels-last strides forbid
            per_net.append({"network": name, "channels_last": False, "how": "failed",
                            "error": f"{type(err).__name__}: {str(err)[:200]}"})
            continue
        won = max(cl) < min(cont) * (1.0 - MARGIN)
        per_net.append({"network": name, "channels_last": won, "how": "timed", "rows": timed_rows,
                        "contiguous_s": [round(s, 6) for s in cont], "channels_last_s": [round(s, 6) for s in cl]})
        if won:
            chosen.append(net)

    def said(n: dict[str, Any]) -> str:
        if n["how"] != "timed":
            return f"{n['network']} {n['how']}" + (f" ({n['error']})" if "error" in n else "")
        gain = 1.0 - min(n["channels_last_s"]) / min(n["contiguous_s"])
        per_row = 1e3 * min(n["contiguous_s"]) / n["rows"]
        return (f"{n['network']} {'channels-last' if n['channels_last'] else 'contiguous'} "
                f"({100 * gain:+.0f} % per call at {n['rows']} rows, contiguous {per_row:.3f} ms a row)")
    detail = "; ".join(said(n) for n in per_net) + f" (channels-last must win every run by {100 * MARGIN:.0f} %)"
    return (LayoutChoice(bool(chosen), "timed", detail, tuple(per_net), time.perf_counter() - t0),
            ChannelsLast(chosen) if chosen else None)


def settle(requested: bool | str, defenses: Sequence[Defense], device: torch.device, timer: Timer, draws: int,
           rows: int, converted: bool = False) -> LayoutChoice:
    """The networks' memory format: as configured, or (auto) by `choose` on their calls in one
    sample's dominant step (`timer` at one sample's rows); logged. `true` converts here unless
    the networks are already in that format (`converted`: the evaluation's FastNet)."""
    pinned = os.environ.get(ENV, "").strip().lower()
    if requested == AUTO and pinned in ("false", "0", "off"):
        choice = LayoutChoice(False, "environment", f"auto resolved to contiguous by {ENV}={pinned}")
    elif requested != AUTO:
        choice = LayoutChoice(bool(requested), "configured", "evaluation.channels_last pinned in the config")
        if requested is True and not converted:
            ChannelsLast(networks(defenses))
    else:
        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        choice, _ = choose(networks(defenses), lambda: timer(draws, False), rows, sync=sync)
    log.info("evaluation.channels_last %s on %s: %s (%s; %s)", requested, device,
             "channels-last" if choice.channels_last else "contiguous", choice.how, choice.detail)
    return choice
