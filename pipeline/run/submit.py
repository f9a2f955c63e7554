"""Jobs on a running Ray cluster through Ray's Job Submission SDK: submit, status, logs, stop.

`submit` validates the config here, writes the resolved YAML (overrides applied) into a
small staging folder that becomes the job's `working_dir`, and ships the `pipeline`
package as a `py_module` (so the cluster runs the submitter's code), or, with
`ship_code=False`, relies on advpure installed on every node (cluster.yaml does that). The
entrypoint is `python -m pipeline.cli run job.yaml`: inside a submitted job RAY_ADDRESS is
set, so the driver joins that cluster.

Nothing secret travels with a submission: no environment variables are forwarded (the
runtime env is readable by anyone who can reach the job API). S3 credentials belong in the
nodes' environment or instance profile. With Ray token authentication on (the default for
new clusters), the SDK sends the token from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH /
~/.ray/auth_token; it is never logged here.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import yaml

import pipeline
from pipeline import config as config_mod

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """The job server cannot be reached or refused the request (the message says which)."""


class AuthError(SubmitError):
    """The job server answered but refused this client's Ray token (missing or wrong)."""


# how Ray's job server words a refused token (HTTP 401 / 403 from its token middleware)
_AUTH_WORDS = ("authentication token", "authentication required", "authentication failed", "unauthorized",
               "forbidden")


def _token_source() -> str | None:
    """Where Ray's client takes its token from here, in Ray's order of precedence (never the token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"the file RAY_AUTH_TOKEN_PATH names ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.exists() else None


def auth_problem(address: str, err: BaseException) -> AuthError | None:
    """An AuthError saying what to set when `err` is the job server refusing our token."""
    text = str(err)
    if not any(w in text.lower() for w in _AUTH_WORDS):
        return None
    mode = os.environ.get("RAY_AUTH_MODE")
    source = _token_source()
    if mode != "token":
        fix = (f"RAY_AUTH_MODE is {mode or 'not set'} here, so no token was sent: export RAY_AUTH_MODE=token "
               "and the cluster's token in RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH, or "
               "~/.ray/auth_token)")
    elif source is None:
        fix = ("no token found: set RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file "
               "holding it, or write it to ~/.ray/auth_token)")
    else:
        fix = f"the token from {source} is not this cluster's: use the one the cluster was started with"
    return AuthError(f"the Ray job server at {address} was reached but refused the request, an authentication "
                     f"problem ({_first_line(err)}): {fix}; `ray get-auth-token` on the head node prints the "
                     "cluster's token (docs/storage_and_cluster.md)")


def client(address: str):
    """A JobSubmissionClient for `address`; errors name the address, never a token."""
    from ray.job_submission import JobSubmissionClient

    host = urlparse(address).hostname or ""
    if address.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the job API at %s is plain HTTP on a non-loopback address: prefer an SSH tunnel "
                    "(`ray dashboard cluster.yaml`) or https", address)
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001 - requests / Ray raise many kinds; all mean "not reachable"
        auth = auth_problem(address, err)
        if auth is not None:
            raise auth from None
        raise SubmitError(f"cannot reach the Ray job server at {address}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _call(address: str, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except SubmitError:
        raise
    except Exception as err:  # noqa: BLE001 - reported with the job server's address
        auth = auth_problem(address, err)
        if auth is not None:
            raise auth from None
        raise SubmitError(f"{what} at {address} failed: {_first_line(err)}") from None


def _submission_id(job_name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", job_name.lower()).strip("-")[:40] or "job"
    return f"advpure-{slug}-{uuid.uuid4().hex[:8]}"


def runtime_env(staging: Path, ship_code: bool) -> dict[str, Any]:
    """working_dir: the staging folder (job.yaml only); py_modules: this checkout's package."""
    env: dict[str, Any] = {"working_dir": str(staging), "env_vars": {"PYTHONUNBUFFERED": "1"}}
    if ship_code:
        env["py_modules"] = [str(Path(pipeline.__file__).resolve().parent)]
        env["excludes"] = ["__pycache__", "*.pyc"]
    return env


def submit(config_path: str, address: str, overrides: list[str] | None = None, ship_code: bool = True,
           python: str = "python") -> str:
    """Submit a job; returns its submission id."""
    cfg = config_mod.load(config_path, overrides, check_components=False)  # files are checked on the cluster
    job_client = client(address)
    staging = Path(tempfile.mkdtemp(prefix="advpure-submit-"))
    try:
        (staging / "job.yaml").write_text(config_mod.dump(cfg))
        sid = _submission_id(cfg.job.name)
        _call(address, "submitting the job", lambda: job_client.submit_job(
            entrypoint=f"{python} -m pipeline.cli run job.yaml", submission_id=sid,
            runtime_env=runtime_env(staging, ship_code),
            metadata={"advpure_job": cfg.job.name, "config_hash": cfg.hash(), "output": cfg.job.output}))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the SDK uploaded it already
    log.info("submitted %s (job %s, output %s)", sid, cfg.job.name, cfg.job.output)
    return sid


def status(address: str, job_id: str) -> dict[str, Any]:
    """Status, message, entrypoint, times and metadata of a job."""
    job_client = client(address)
    info = _call(address, f"reading job {job_id}", lambda: job_client.get_job_info(job_id))
    def when(ms: int | None) -> str | None:  # the job API reports epoch milliseconds
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else None

    return {"job_id": job_id, "status": str(getattr(info.status, "value", info.status)),
            "message": info.message, "entrypoint": info.entrypoint, "start_time": when(info.start_time),
            "end_time": when(info.end_time), "metadata": info.metadata or {}}


def wait(address: str, job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or the timeout); its status."""
    job_client = client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        raw = _call(address, f"reading job {job_id}", lambda: job_client.get_job_status(job_id))
        st = str(getattr(raw, "value", raw))
        if st in TERMINAL or time.monotonic() > deadline:
            return st
        time.sleep(poll_s)


def logs(address: str, job_id: str, follow: bool = False, write: Callable[[str], Any] = print) -> None:
    """The job's driver output; with `follow`, streamed until the job ends."""
    job_client = client(address)
    if not follow:
        write(_call(address, f"reading logs of {job_id}", lambda: job_client.get_job_logs(job_id)))
        return

    async def tail() -> None:
        async for chunk in job_client.tail_job_logs(job_id):
            write(chunk)
    _call(address, f"following logs of {job_id}", lambda: asyncio.run(tail()))


def stop(address: str, job_id: str, timeout_s: float = 60.0) -> str:
    """Ask the job to stop; its status once it has ended (or the last seen at the timeout)."""
    job_client = client(address)
    _call(address, f"stopping {job_id}", lambda: job_client.stop_job(job_id))
    return wait(address, job_id, timeout_s)


def format_status(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False).rstrip()
