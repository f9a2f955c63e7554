"""A real single-node Slurm on 127.0.0.1 for tests: munged, slurmctld and slurmd.

Debian's `slurm-wlm` and `munge` packages (`.ci/run` installs them on CI). Everything lives in
one temporary folder: the munge key, socket, pid, log and seed files; a generated
`slurm.conf` (one node named after `hostname -s` with NodeAddr=127.0.0.1, one partition,
`proctrack/linuxproc`, `task/none`, no accounting, free non-default ports); the controller's
state and the node's spool. Client commands (sbatch, squeue, scancel, srun inside a job)
find it through SLURM_CONF, which `Slurm.env()` sets:

    with slurmcluster.running(tmp_dir) as slurm:
        subprocess.run(["sbatch", "--wrap", "true"], env=slurm.env())

The daemons run in the foreground in their own sessions and are stopped by pid (SIGTERM,
then SIGKILL of their process groups); every wait is bounded.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tests.s3server import free_ports, kill_group

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun")
PARTITION = "advpure"


class SlurmUnavailable(RuntimeError):
    """No Slurm could be started here (the message says why)."""


def missing_binaries() -> list[str]:
    """The daemons and client commands that are not installed."""
    return [b for b in (*DAEMONS, *CLIENTS, "mungekey") if _which(b) is None]


def _which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@dataclass
class Slurm:
    root: Path
    conf: Path
    node: str
    partition: str
    cpus: int
    procs: list[subprocess.Popen] = field(default_factory=list)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a client command: SLURM_CONF pointing at this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)

    def node_state(self) -> str:
        out = self.run("sinfo", "-h", "-n", self.node, "-o", "%T")
        return out.stdout.strip() or f"(sinfo failed: {out.stderr.strip()})"

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def logs(self, n: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}"
                         for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):     # slurmd, slurmctld, then munged
            kill_group(proc, grace_s=5)


def _conf(root: Path, node: str, cpus: int, ports: list[int]) -> str:
    ctld, slurmd = ports
    return "\n".join([
        "ClusterName=advpuretest",
        f"SlurmctldHost={node}(127.0.0.1)",
        "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={ctld}", f"SlurmdPort={slurmd}",
        "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "SlurmctldDebug=info", "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "MpiDefault=none", "ReturnToService=2", "SlurmdTimeout=30", "InactiveLimit=0",
        "KillWait=30", "MinJobAge=600", "SchedulerParameters=sched_interval=2",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _launch(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _wait(what: str, ok, slurm: Slurm, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return
        dead = [p.args[0] for p in slurm.procs if p.poll() is not None]
        if dead:
            raise SlurmUnavailable(f"{', '.join(dead)} exited while waiting for {what}: {slurm.logs()}")
        time.sleep(0.25)
    raise SlurmUnavailable(f"{what} not reached after {timeout_s:.0f}s: {slurm.logs()}")


def start(root: str | Path, timeout_s: float = 60.0) -> Slurm:
    """munged, slurmctld and slurmd with everything in `root`; returns once the node is idle."""
    missing = missing_binaries()
    if missing:
        raise SlurmUnavailable(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurmd must run as root to launch jobs (SlurmUser=root)")
    root = Path(root)
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)                       # munged refuses a socket folder others may write to
    node, cpus = socket.gethostname().split(".")[0], os.cpu_count() or 1
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, node, cpus, free_ports(2)))
    slurm = Slurm(root, conf, node, PARTITION, cpus)
    env = slurm.env()
    key = root / "munge.key"
    subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, timeout=30,
                   capture_output=True)
    try:
        slurm.procs.append(_launch([_which("munged"), "--foreground", "--force", f"--socket={root / 'munge.socket'}",
                                    f"--key-file={key}", f"--pid-file={root / 'munged.pid'}",
                                    f"--log-file={root / 'munged.log'}", f"--seed-file={root / 'munged.seed'}"],
                                   root / "munged.out.log", env))
        _wait("the munge socket", (root / "munge.socket").exists, slurm, timeout_s)
        slurm.procs.append(_launch([_which("slurmctld"), "-D", "-i", "-f", str(conf)], root / "slurmctld.out.log",
                                   env))
        _wait("slurmctld answering", lambda: slurm.run("sinfo", "-h").returncode == 0, slurm, timeout_s)
        slurm.procs.append(_launch([_which("slurmd"), "-D", "-f", str(conf), "-N", node], root / "slurmd.out.log",
                                   env))
        _wait(f"node {node} idle", lambda: slurm.node_state() == "idle", slurm, timeout_s)
    except BaseException:
        slurm.stop()
        raise
    return slurm


@contextlib.contextmanager
def running(root: str | Path) -> Iterator[Slurm]:
    slurm = start(root)
    try:
        yield slurm
    finally:
        slurm.stop()
