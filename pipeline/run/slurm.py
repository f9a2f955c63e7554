"""Jobs on a Slurm cluster: `advpure submit --slurm`, and status / logs / stop of `slurm:<id>`.

`job_script` fills the sbatch template shipped with the package (slurm_job.sh.tmpl): Ray's
documented Slurm pattern (one `ray start --head --block` on the first node and one
`ray start --address --block` on each other node, each in its own `srun` step), a bounded
wait until the Ray cluster has the nodes, CPUs and GPUs asked for (`wait-ray`, below), then
`advpure run` against it through RAY_ADDRESS, and a trap that stops everything on exit,
failure or scancel. The resolved job YAML (overrides applied) travels inside the script, so
nothing but the job's inputs and output (shared filesystem or S3) must be shared.

Everything that talks to Slurm goes through its commands (sbatch, squeue, scontrol, scancel,
sinfo); the parsing of their output is pure and tested on its own. Slurm is found through the
usual environment (PATH, SLURM_CONF).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import logging
import math
import os
import re
import shlex
import site
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pipeline
from pipeline import config as config_mod

log = logging.getLogger(__name__)

PREFIX = "slurm:"
TEMPLATE = "slurm_job.sh.tmpl"
# per-job port blocks of 10 in [10000, 32760): below Linux's ephemeral range (32768-60999)
PORT_FIRST, PORT_SLOTS = 10000, 2276
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING",
          "STAGE_OUT", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "STOPPED")
SUCCEEDED = ("COMPLETED",)
COMMAND_TIMEOUT_S = 60.0


class SlurmError(RuntimeError):
    """A Slurm command failed or is missing (the message names the command and its error)."""


class RequestError(ValueError):
    """The job asks for what the request or the partition cannot give: a user mistake (exit 2)."""


@dataclass(frozen=True)
class Request:
    """What the sbatch script asks Slurm for."""
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None       # None: enough for the job's workers (`cpus_for`)
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    sbatch_args: tuple[str, ...] = ()
    start_timeout_s: float = 300.0         # the job's wait for its Ray nodes


# ---------------------------------------------------------------------------- ids

def is_slurm_id(job_id: str) -> bool:
    return job_id.startswith(PREFIX)


def slurm_id(job_id: str) -> str:
    """`slurm:123` or `123` → `123`; anything else is refused (exit 2 from the CLI)."""
    raw = job_id[len(PREFIX):] if is_slurm_id(job_id) else job_id
    if not re.fullmatch(r"\d+(_\d+)?", raw):
        raise RequestError(f"{job_id!r} is not a Slurm job id (slurm:<number>, as `advpure submit --slurm` prints)")
    return raw


# ---------------------------------------------------------------------------- sizing

def _worker_need(cfg: config_mod.Config, gpus_per_node: int) -> tuple[float, float]:
    """(CPUs, GPUs) one worker actor asks for, as driver.worker_resources will resolve them."""
    c = cfg.cluster
    g = c.gpus_per_worker
    if g == "auto":
        g = 1.0 if gpus_per_node >= 1 else 0.0
    return float(c.cpus_per_worker), (float(g) / c.workers_per_gpu if g else 0.0)


def cpus_for(cfg: config_mod.Config, req: Request) -> int:
    """CPUs per node when --cpus-per-node is not given: enough for this node's share of workers."""
    cpw, gpw = _worker_need(cfg, req.gpus_per_node)
    if cfg.cluster.num_workers != "auto":
        return max(1, math.ceil(math.ceil(cfg.cluster.num_workers / req.nodes) * cpw))
    if gpw > 0:
        return max(1, math.ceil(math.floor(req.gpus_per_node / gpw + 1e-9) * cpw))
    raise RequestError("cluster.num_workers is auto and the job uses no GPU: say how many CPUs each node "
                       "gets (--cpus-per-node)")


def check_fits(cfg: config_mod.Config, req: Request, cpus_per_node: int) -> None:
    """The allocation can host the job's workers (RequestError naming the resource if not)."""
    cpw, gpw = _worker_need(cfg, req.gpus_per_node)
    if gpw > 0 and req.gpus_per_node == 0:
        raise RequestError(f"each worker asks for {gpw:g} GPU (cluster.gpus_per_worker / workers_per_gpu) but "
                           f"the allocation has none: add --gpus-per-node N (or set cluster.gpus_per_worker: 0)")
    per_node = math.floor(cpus_per_node / cpw + 1e-9) if cpw > 0 else 10**9
    if gpw > 0:
        per_node = min(per_node, math.floor(req.gpus_per_node / gpw + 1e-9))
    wanted = cfg.cluster.num_workers
    if per_node * req.nodes < (1 if wanted == "auto" else wanted):
        raise RequestError(
            f"cluster.num_workers is {wanted} with {cpw:g} CPU and {gpw:g} GPU each; {req.nodes} node(s) × "
            f"({cpus_per_node} CPUs, {req.gpus_per_node} GPUs) host {per_node * req.nodes}: raise --cpus-per-node, "
            f"--gpus-per-node or --nodes, or lower cluster.num_workers")


# ---------------------------------------------------------------------------- the script

def _directives(req: Request) -> list[str]:
    lines = [f"--gres=gpu:{req.gpus_per_node}"] if req.gpus_per_node else []
    for flag, value in (("partition", req.partition), ("time", req.time), ("account", req.account),
                        ("qos", req.qos)):
        if value:
            lines.append(f"--{flag}={value}")
    for arg in req.sbatch_args:
        if not arg.startswith("-") or "\n" in arg:
            raise RequestError(f"--sbatch-arg {arg!r}: give one sbatch option, e.g. --sbatch-arg=--mem=32G")
        lines.append(arg)
    return [f"#SBATCH {line}" for line in lines]


def _pythonpath_line(ship_code: bool) -> str:
    """Put this checkout's `pipeline` first on the nodes' path, unless it is installed there."""
    root = str(Path(pipeline.__file__).resolve().parent.parent)
    if not ship_code or root in {str(Path(p).resolve()) for p in site.getsitepackages()}:
        return "# advpure as installed for $PYTHON"
    return f"export PYTHONPATH={shlex.quote(root)}${{PYTHONPATH:+:$PYTHONPATH}}"


def _job_name(name: str) -> str:
    return "advpure-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:40] or "job")


def render(template: str, values: dict[str, str]) -> str:
    """`{{name}}` → values[name]; a name without a value is an error (never left in a script)."""
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template {TEMPLATE}: no value for {{{{{m.group(1)}}}}}")
        return str(values[m.group(1)])
    return re.sub(r"\{\{(\w+)\}\}", sub, template)


def job_script(cfg: config_mod.Config, req: Request, *, python: str, workdir: str, log_file: str,
               ship_code: bool = True) -> str:
    """The sbatch script for `cfg` (cluster.address cleared: the job joins its own Ray)."""
    if req.nodes < 1 or req.gpus_per_node < 0 or (req.cpus_per_node is not None and req.cpus_per_node < 1):
        raise RequestError(f"--nodes must be ≥ 1, --gpus-per-node ≥ 0, --cpus-per-node ≥ 1 (got {req.nodes}, "
                           f"{req.gpus_per_node}, {req.cpus_per_node})")
    cpus = req.cpus_per_node or cpus_for(cfg, req)
    check_fits(cfg, req, cpus)
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, address=None))
    text = config_mod.dump(cfg).rstrip("\n")
    eof = "ADVPURE_JOB_YAML"
    while eof in text:
        eof += "_"
    template = importlib.resources.files("pipeline.run").joinpath(TEMPLATE).read_text()
    return render(template, {
        "job_name": _job_name(cfg.job.name), "nodes": req.nodes, "cpus_per_node": cpus,
        "gpus_per_node": req.gpus_per_node, "log_file": log_file, "workdir": workdir,
        "directives": "\n".join(_directives(req)), "advpure_job": cfg.job.name.replace("\n", " "),
        "config_hash": cfg.hash(), "python": shlex.quote(python), "pythonpath": _pythonpath_line(ship_code),
        "start_timeout_s": int(req.start_timeout_s), "port_first": PORT_FIRST, "port_slots": PORT_SLOTS,
        "yaml_eof": eof, "job_yaml": text})


def port_block(job_id: int) -> int:
    """The first of the job's 10 Ray ports (the template's PORT_BASE)."""
    return PORT_FIRST + (job_id % PORT_SLOTS) * 10


# ---------------------------------------------------------------------------- Slurm commands

def run_command(args: list[str], input_text: str | None = None, timeout_s: float = COMMAND_TIMEOUT_S
                ) -> subprocess.CompletedProcess:
    """Run a Slurm command; SlurmError if it is missing or hangs (its exit code is the caller's)."""
    try:
        return subprocess.run(args, input=input_text, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise SlurmError(f"`{args[0]}` not found: is this a Slurm login node (Slurm's commands on PATH)?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(args[:3])}` did not answer within {timeout_s:.0f}s: is slurmctld up?") from None


def _error_text(proc: subprocess.CompletedProcess) -> str:
    return " ".join((proc.stderr or proc.stdout or f"exit code {proc.returncode}").split())


@dataclass(frozen=True)
class PartitionNode:
    name: str
    cpus: int
    gpus: int
    gres: str


def parse_gpus(gres: str) -> int:
    """GPUs in a sinfo %G field: `gpu:2`, `gpu:a100:4(S:0-1)`, `gpu:1,shard:8`, `(null)` → 0."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


def parse_sinfo_nodes(text: str) -> tuple[str | None, dict[str, list[PartitionNode]]]:
    """`sinfo -h -N -o '%P|%N|%c|%G'` → (default partition, {partition: nodes})."""
    default, parts = None, {}
    for line in text.splitlines():
        if line.count("|") != 3:
            continue
        part, node, cpus, gres = (f.strip() for f in line.split("|"))
        if part.endswith("*"):
            part = default = part[:-1]
        parts.setdefault(part, []).append(PartitionNode(node, int(re.sub(r"\D.*", "", cpus) or 0),
                                                        parse_gpus(gres), gres))
    return default, parts


def check_partition(req: Request, cpus_per_node: int, default: str | None,
                    parts: dict[str, list[PartitionNode]]) -> None:
    """RequestError naming the resource when the partition cannot ever run the request."""
    name = req.partition or default
    if name is None:
        return
    nodes = parts.get(name)
    if nodes is None:
        raise RequestError(f"no partition {name!r} (partitions: {', '.join(sorted(parts)) or 'none'})")
    most_gpus, most_cpus = max(n.gpus for n in nodes), max(n.cpus for n in nodes)
    if req.gpus_per_node > most_gpus:
        gres = sorted({n.gres for n in nodes})
        raise RequestError(f"{req.gpus_per_node} GPUs per node requested (--gpus-per-node), but partition "
                           f"{name!r} has at most {most_gpus} per node (gres: {', '.join(gres)})")
    if cpus_per_node > most_cpus:
        raise RequestError(f"{cpus_per_node} CPUs per node requested (--cpus-per-node, or the job's workers), "
                           f"but partition {name!r} has at most {most_cpus} per node")
    fit = [n for n in nodes if n.gpus >= req.gpus_per_node and n.cpus >= cpus_per_node]
    if len(fit) < req.nodes:
        raise RequestError(f"{req.nodes} nodes requested (--nodes) with {cpus_per_node} CPUs and "
                           f"{req.gpus_per_node} GPUs each, but partition {name!r} has {len(fit)} such node(s) "
                           f"of {len(nodes)}")


def _partition_check(req: Request, cpus_per_node: int) -> str:
    """Check against sinfo; returns a line describing the partition for sbatch's errors."""
    proc = run_command(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%G"])
    if proc.returncode != 0:
        log.warning("sinfo failed (%s): the partition is not checked before sbatch", _error_text(proc))
        return ""
    default, parts = parse_sinfo_nodes(proc.stdout)
    check_partition(req, cpus_per_node, default, parts)
    name = req.partition or default
    nodes = parts.get(name or "", [])
    return (f"partition {name!r}: {len(nodes)} node(s), at most {max((n.cpus for n in nodes), default=0)} CPUs "
            f"and {max((n.gpus for n in nodes), default=0)} GPUs per node") if nodes else ""


def sbatch(script: str, describe: str = "") -> str:
    """Submit the script (on stdin); the Slurm job id. Slurm's refusal → RequestError naming it."""
    proc = run_command(["sbatch", "--parsable"], input_text=script)
    if proc.returncode != 0:
        raise RequestError(f"Slurm refused the job: {_error_text(proc)}" + (f" ({describe})" if describe else ""))
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {proc.stdout.strip()!r}, not a job id")
    return job_id


def submit(config_path: str, req: Request, overrides: list[str] | None = None, *, dry_run: bool = False,
           python: str | None = None, ship_code: bool = True) -> tuple[str, str | None]:
    """(the sbatch script, the `slurm:<id>` it was submitted as; None with dry_run)."""
    cfg = config_mod.load(config_path, overrides, check_components=False)   # files are checked in the job
    workdir = os.getcwd()
    script = job_script(cfg, req, python=python or sys.executable, workdir=workdir,
                        log_file=str(Path(workdir, "advpure-slurm-%j.out")), ship_code=ship_code)
    if dry_run:
        return script, None
    cpus = int(re.search(r"^#SBATCH --cpus-per-task=(\d+)$", script, re.M).group(1))
    describe = _partition_check(req, cpus)
    job_id = sbatch(script, describe)
    log.debug("submitted Slurm job %s (job %s, output %s)", job_id, cfg.job.name, cfg.job.output)
    return script, PREFIX + job_id


# ---------------------------------------------------------------------------- status / logs / stop

_KEY = r"[A-Za-z][\w/:]*"


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show job -o ID` (Key=Value ..., values may hold `=` and spaces) → dict."""
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(rf"(?:^|\s)({_KEY})=(.*?)(?=\s{_KEY}=|\s*$)", text.strip())}


def parse_sacct(text: str) -> dict[str, str] | None:
    """`sacct -X -n -P -o JobID,JobName,State,ExitCode,Start,End,NodeList` → the job's fields."""
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) == 7:
            keys = ("JobId", "JobName", "JobState", "ExitCode", "StartTime", "EndTime", "NodeList")
            return dict(zip(keys, fields))
    return None


def _job_fields(raw: str) -> dict[str, str]:
    proc = run_command(["scontrol", "show", "job", "-o", raw])
    if proc.returncode == 0 and proc.stdout.strip():
        return parse_scontrol(proc.stdout.splitlines()[0])
    first = _error_text(proc)
    acct = run_command(["sacct", "-j", raw, "-X", "-n", "-P", "-o",
                        "JobID,JobName,State,ExitCode,Start,End,NodeList"])
    fields = parse_sacct(acct.stdout) if acct.returncode == 0 else None
    if fields is None:
        raise SlurmError(f"Slurm job {raw} is unknown: the controller says {first!r} (it forgets finished jobs "
                         f"after MinJobAge) and sacct has no record ({_error_text(acct) or 'no rows'})")
    return fields


def status(job_id: str) -> dict[str, Any]:
    """State, reason, exit code, nodes, times and log file of a Slurm job (scontrol, else sacct)."""
    raw = slurm_id(job_id)
    f = _job_fields(raw)
    state = (f.get("JobState") or "UNKNOWN").split()[0]      # sacct: "CANCELLED by 0"
    when = lambda v: None if v in (None, "", "Unknown", "None", "N/A") else v
    return {"job_id": PREFIX + raw, "status": state, "reason": when(f.get("Reason")),
            "exit_code": f.get("ExitCode"), "name": f.get("JobName"), "nodes": when(f.get("NodeList")),
            "submit_time": when(f.get("SubmitTime")), "start_time": when(f.get("StartTime")),
            "end_time": when(f.get("EndTime")), "log": when(f.get("StdOut")) or default_log(raw)}


def default_log(raw: str) -> str:
    """Where `advpure submit --slurm` run from this folder writes the job's output."""
    return str(Path.cwd() / f"advpure-slurm-{raw}.out")


def is_active(state: str) -> bool:
    return state in ACTIVE


def logs(job_id: str, follow: bool = False, write: Callable[[str], Any] = print, poll_s: float = 1.0) -> None:
    """The job's output file; with `follow`, streamed until the job has ended."""
    doc = status(job_id)
    path, pos = Path(doc["log"]), 0
    while True:
        if path.exists():
            with open(path, errors="replace") as fh:
                fh.seek(pos)
                chunk = fh.read()
                pos = fh.tell()
            if chunk:
                write(chunk)
        elif not is_active(doc["status"]) or not follow:
            if doc["status"] == "PENDING":
                log.warning("%s is PENDING (%s): no output yet", doc["job_id"], doc.get("reason"))
                return
            raise FileNotFoundError(f"no output file {path} for {doc['job_id']} ({doc['status']}): "
                                    f"run this from the folder it was submitted from")
        if not follow or not is_active(doc["status"]):
            return
        time.sleep(poll_s)
        doc = status(job_id)


def wait(job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Poll until the job has left the active states (or the timeout); its state."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = status(job_id)["status"]
        if not is_active(state) or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


def stop(job_id: str, timeout_s: float = 60.0) -> str:
    """scancel the job; its state once it has ended (or the last seen at the timeout)."""
    raw = slurm_id(job_id)
    proc = run_command(["scancel", raw])
    if proc.returncode != 0:
        raise SlurmError(f"scancel {raw} failed: {_error_text(proc)}")
    return wait(job_id, timeout_s)


def format_status(doc: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False).rstrip()


# ---------------------------------------------------------------------------- inside the job

def missing_resources(alive: list[dict[str, float]], nodes: int, cpus: int, gpus: int) -> list[str]:
    """What the Ray cluster lacks for `nodes` nodes of `cpus` CPUs and `gpus` GPUs (empty: ready)."""
    out = []
    if len(alive) < nodes:
        out.append(f"{nodes} node(s) requested, {len(alive)} joined")
    for name, per_node in (("GPU", gpus), ("CPU", cpus)):
        have = sum(n.get(name, 0.0) for n in alive)
        if have + 1e-9 < nodes * per_node:
            out.append(f"{nodes * per_node} {name}s requested ({per_node} per node), cluster has {have:g}")
    return out


def wait_ray(nodes: int, cpus: int, gpus: int, timeout_s: float, poll_s: float = 1.0) -> int:
    """Until the Ray cluster at RAY_ADDRESS has the job's nodes and resources: 0, else 3 and why."""
    import ray

    deadline, missing = time.monotonic() + timeout_s, ["no answer from the Ray head"]
    while True:
        try:
            if not ray.is_initialized():
                ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level=logging.ERROR,
                         log_to_driver=False)
            missing = missing_resources([n["Resources"] for n in ray.nodes() if n.get("Alive")], nodes, cpus, gpus)
        except Exception as err:  # noqa: BLE001 - the head may still be starting: reported at the deadline
            missing = [f"cannot reach the Ray head: {' '.join(str(err).split())[:300]}"]
        if not missing:
            ray.shutdown()
            print(f"advpure-slurm: Ray cluster ready: {nodes} node(s), {nodes * cpus} CPUs, {nodes * gpus} GPUs",
                  flush=True)
            return 0
        if time.monotonic() > deadline:
            print(f"advpure-slurm: the Ray cluster is not ready after {timeout_s:.0f}s: {'; '.join(missing)}",
                  file=sys.stderr, flush=True)
            return 3
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.run.slurm wait-ray ...`: the job script's wait for its Ray nodes."""
    p = argparse.ArgumentParser(prog="python -m pipeline.run.slurm")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait-ray", help="wait until the Ray cluster at RAY_ADDRESS has the job's resources")
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--cpus", type=int, required=True, help="CPUs per node")
    w.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    w.add_argument("--timeout", type=float, required=True, help="seconds")
    args = p.parse_args(argv)
    return wait_ray(args.nodes, args.cpus, args.gpus, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
