"""The job lease: at most one driver works on a `job.output` at a time.

`<output>/lease.json` names its holder (a random id, host, pid) and carries a heartbeat the
holder renews every `cluster.lease_heartbeat_s`. It is created with a conditional write
(S3 `If-None-Match: *`; locally an O_EXCL link) and renewed or taken over with
compare-and-swap (S3 `If-Match` on the ETag; locally under flock), so two drivers can never
both believe they hold it on a store that honours those headers. On a store that ignores
them the lease is best effort: the holder reads the lease back after every write and
stops at the first renewal that finds another holder.

A second driver finds the lease and refuses, naming the holder and how to take over. A lease
is taken over when its heartbeat is older than `cluster.lease_timeout_s` (the holder stopped
renewing: killed, or cut off from the store), or at once when it names a process on this
machine that no longer exists. A holder that cannot renew for 0.8 × the timeout fences
itself (`check()` raises) before anyone may take over, so its workers stop before a new
driver cleans the stage. Heartbeats compare wall clocks of different hosts: keep them in
sync (NTP), or raise the timeout.

Pure storage logic: no Ray, no torch.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.io import storage

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"
SELF_FENCE = 0.8            # the holder stops at this fraction of the timeout without renewal


class LeaseHeld(RuntimeError):
    """Another live driver holds the output's lease."""


class LeaseLost(RuntimeError):
    """This driver no longer holds the lease (taken over, or not renewed in time)."""


def lease_url(output: str) -> str:
    return storage.join(output, LEASE_NAME)


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()[19]


def _machine() -> str:
    """Host name, kernel boot and pid namespace: equal only where /proc shows the same pids."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("pid") else Path(path).read_text().strip())
        except OSError:
            parts.append("?")
    return "|".join(parts)


def _holder_dead_here(doc: dict[str, Any]) -> bool:
    """True if the holder ran on this machine and its process is gone (or the pid now
    belongs to a later process)."""
    if doc.get("machine") != _machine() or not isinstance(doc.get("pid"), int):
        return False
    return _proc_start(doc["pid"]) != doc.get("pid_start")


def describe(doc: dict[str, Any], now: float | None = None) -> str:
    age = (now or time.time()) - float(doc.get("heartbeat", 0))
    return (f"holder {doc.get('holder')} (host {doc.get('host')}, pid {doc.get('pid')}, job {doc.get('job')!r}), "
            f"last heartbeat {age:.0f}s ago")


class Lease:
    """A held lease; renewed by a daemon thread until `release()`."""

    def __init__(self, url: str, doc: dict[str, Any], version: str, timeout_s: float, heartbeat_s: float,
                 took_over: dict[str, Any] | None, conditional: bool = True):
        self.url, self.doc, self.timeout_s, self.heartbeat_s = url, doc, timeout_s, heartbeat_s
        self.took_over = took_over          # the previous holder's document, if taken over
        self.conditional = conditional      # False: the store ignores conditional writes
        self._version = version
        self._renewed = time.monotonic()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="advpure-lease", daemon=True)
        self._thread.start()

    @property
    def holder(self) -> str:
        return self.doc["holder"]

    def check(self) -> None:
        """Raise LeaseLost unless this driver still holds the lease."""
        if self._lost:
            raise LeaseLost(self._lost)
        idle = time.monotonic() - self._renewed
        if idle > SELF_FENCE * self.timeout_s:
            raise LeaseLost(f"could not renew the job lease {self.url} for {idle:.0f}s "
                            f"(cluster.lease_timeout_s = {self.timeout_s:.0f}s); stopping before another "
                            "driver may take it over")

    def renew(self) -> None:
        """Write a fresh heartbeat if the lease is still ours; records a loss otherwise."""
        doc = {**self.doc, "heartbeat": time.time()}
        data = json.dumps(doc).encode()
        version = storage.put_if_match(self.url, data, self._version)
        if version is None or not self.conditional:  # changed under us, a retried write, or no CAS: look
            try:
                current, seen = storage.read_versioned(self.url)
                other = json.loads(current)
            except (FileNotFoundError, ValueError):
                other, seen = {"holder": None}, None
            if other.get("holder") != self.holder:
                self._lost = f"the job lease {self.url} was taken over by {describe(other)}"
                log.error("%s", self._lost)
                return
            if version is None:  # still ours at another version (a retried write landed): write from there
                version = storage.put_if_match(self.url, data, seen)
                if version is None:
                    return  # not renewed this time; check() fences if that lasts
        self.doc, self._version, self._renewed = doc, version, time.monotonic()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self._lost:
                return
            try:
                self.renew()
            except OSError as err:  # the store is unreachable: check() fences after the timeout
                log.warning("could not renew the job lease %s: %s", self.url, err)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        self._thread.join(timeout=self.heartbeat_s + storage.RETRY_DEADLINE_S)
        if self._lost:
            return
        try:
            storage.remove_if_match(self.url, self._version)
        except OSError as err:
            log.warning("could not release the job lease %s (it expires by itself): %s", self.url, err)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _refusal(url: str, doc: dict[str, Any], timeout_s: float) -> LeaseHeld:
    age = time.time() - float(doc.get("heartbeat", 0))
    return LeaseHeld(
        f"job.output {storage.dirname(url)} is in use by another driver: {describe(doc)}. Two drivers on "
        f"one output would do every shard twice. To take over: stop that driver (pid {doc.get('pid')} on "
        f"{doc.get('host')}); a driver that died is taken over automatically once its heartbeat is older "
        f"than cluster.lease_timeout_s ({timeout_s:.0f}s, in about {max(0.0, timeout_s - age):.0f}s), or at "
        f"once from the same machine; if you are sure it is dead, delete {url}")


def _stale(doc: dict[str, Any], timeout_s: float) -> bool:
    try:
        age = time.time() - float(doc["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return True  # not a lease this code wrote: nobody renews it
    return age > timeout_s or _holder_dead_here(doc)


def _honours_conditions(url: str, data: bytes) -> bool:
    """Probe: a second create of the lease must be refused. A store that accepts it ignores
    If-None-Match; the lease then falls back to reading back after every renewal."""
    if storage.put_if_absent(url, data) is None:
        return True
    log.warning("the store of %s ignores conditional writes: the job lease is best effort (a second "
                "driver is noticed at its next heartbeat, not refused up front)", url)
    return False


def acquire(output: str, job: str, timeout_s: float, heartbeat_s: float) -> Lease:
    """Take the output's lease, or raise LeaseHeld naming the live holder; a storage error
    (an unwritable output) is raised as StorageError before any work starts."""
    url = lease_url(output)
    now = time.time()
    pid = os.getpid()
    doc = {"holder": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": pid,
           "pid_start": _proc_start(pid), "machine": _machine(), "job": job, "acquired": now,
           "heartbeat": now, "timeout_s": timeout_s}
    data = json.dumps(doc).encode()
    for _ in range(3):  # each pass either ends or saw the lease change hands
        try:
            version = storage.put_if_absent(url, data)
        except OSError as err:
            raise storage.StorageError(f"job.output {output} is not writable: {err}") from err
        previous = None
        if version is None:
            try:
                current, seen = storage.read_versioned(url)
            except FileNotFoundError:
                continue  # released in between: try to create it again
            try:
                previous = json.loads(current)
            except ValueError:
                previous = {}
            if previous.get("holder") == doc["holder"]:
                version = seen  # our own create, retried after a dropped reply
            elif not _stale(previous, timeout_s):
                raise _refusal(url, previous, timeout_s)
            else:
                version = storage.put_if_match(url, data, seen)
                if version is None:
                    continue  # someone else took it over first
                log.warning("took over the job lease from %s", describe(previous, now))
        return Lease(url, doc, version, timeout_s, heartbeat_s, previous, _honours_conditions(url, data))
    raise LeaseHeld(f"could not take the job lease {url}: it kept changing hands")
