"""One URL API for local paths and s3:// (boto3), with an atomic commit for both.

Local: write to a unique temporary name in the target directory, fsync, os.replace.
S3: an object becomes visible whole or not at all, both for a single PUT and for a
multipart upload (visible only once CompleteMultipartUpload succeeds; a failed upload
is aborted). Large puts therefore go multipart without weakening the commit protocol.
https:// is readable (shards) but not writable. Streamed reads of s3 and https objects resume
after a dropped connection from the byte reached, pinned to the object's ETag (ResumableRead).

S3 settings come from the usual AWS environment: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
for S3-compatible servers (SeaweedFS, MinIO, Ceph), AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY or any other boto3 credential source, AWS_REGION.

Transient S3 failures (connection refused or dropped, timeouts, 5xx, throttling) are retried
with exponential backoff for up to RETRY_DEADLINE_S; a put is retried whole, so a restarted
server never exposes part of an object. Conditional writes (`put_if_absent`, `put_if_match`,
`remove_if_match`) give the job lease a compare-and-swap: S3 `If-None-Match: *` / `If-Match`
(a store that ignores them degrades to last-writer-wins), local O_EXCL links and flock.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import random
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)
T = TypeVar("T")

# Puts of at least this many bytes use a multipart upload (parts of MULTIPART_CHUNKSIZE;
# S3 requires ≥ 5 MiB per part except the last). Module attributes so tests can lower them.
MULTIPART_THRESHOLD = 64 * 2**20
MULTIPART_CHUNKSIZE = 16 * 2**20
LIST_PAGE_SIZE = 1000
# transient S3 errors are retried with backoff RETRY_BASE_S · 2^n (jittered, capped at 5 s)
# until RETRY_DEADLINE_S has passed since the first attempt
RETRY_DEADLINE_S = 60.0
RETRY_BASE_S = 0.25
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "RequestLimitExceeded"}


class StorageError(OSError):
    pass


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def join(base: str, *parts: str) -> str:
    if is_s3(base) or is_http(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def dirname(url: str) -> str:
    if is_s3(url) or is_http(url):
        return url.rstrip("/").rsplit("/", 1)[0]
    return str(Path(url).parent)


# ---------------------------------------------------------------------------- s3

_clients: dict = {}
_clients_lock = threading.Lock()


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3():
    """A boto3 S3 client for this process and environment.

    Keyed by pid: a client (its connection pool) must not cross a fork, and Ray workers
    may be forked. Keyed by endpoint and key id: tests and tools switch servers. A fresh
    Session per client because boto3's default session is not thread-safe.
    """
    endpoint = _endpoint()
    key = (os.getpid(), endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_REGION"))
    client = _clients.get(key)
    if client is None:
        import boto3
        from botocore.config import Config

        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                # S3-compatible servers rarely have wildcard DNS for virtual-hosted buckets
                cfg = Config(s3={"addressing_style": "path"} if endpoint else {}, max_pool_connections=16)
                client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)
                _clients[key] = client
    return client


def _split(url: str) -> tuple[str, str]:
    p = urlparse(url)
    if not p.netloc:
        raise StorageError(f"{url}: no bucket in S3 URL (expected s3://bucket/key)")
    return p.netloc, p.path.lstrip("/")


def _s3_error(url: str, err: Exception) -> OSError:
    """Translate a boto3 error into FileNotFoundError / StorageError naming the URL."""
    from botocore.exceptions import ClientError

    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            return FileNotFoundError(f"no such object: {url}")
        if code == "NoSuchBucket":
            return StorageError(f"{url}: no such bucket {_split(url)[0]!r}")
    return StorageError(f"{url}: {err}")


def _transient(err: BaseException) -> bool:
    """A failure worth retrying: the connection, a timeout, a 5xx or throttling; never a 4xx."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, ResponseStreamingError

    if isinstance(err, (ConnectionError, HTTPClientError, ResponseStreamingError)):
        return True
    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or err.response.get("Error", {}).get("Code") in _THROTTLE_CODES
    # s3transfer wraps a failed multipart upload (already aborted); its cause decides
    return isinstance(err, S3UploadFailedError) and err.__context__ is not None and _transient(err.__context__)


def _retrying(what: str, url: str, fn: Callable[[], T]) -> T:
    """`fn()` with transient S3 errors retried under backoff until RETRY_DEADLINE_S."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + RETRY_DEADLINE_S
    attempt = 0
    while True:
        try:
            return fn()
        except (ClientError, BotoCoreError, Boto3Error) as err:
            delay = min(5.0, RETRY_BASE_S * 2**attempt) * (0.5 + random.random() / 2)
            if not _transient(err) or time.monotonic() + delay > deadline:
                raise _s3_error(url, err) from err
            attempt += 1
            log.warning("S3 %s %s failed (%s); retry %d in %.1fs", what, url, type(err).__name__, attempt, delay)
            time.sleep(delay)


def _s3_call(fn, url: str, **kw):
    bucket, key = _split(url)
    return _retrying(getattr(fn, "__name__", "call"), url, lambda: fn(Bucket=bucket, Key=key, **kw))


def _s3_put(url: str, data: bytes) -> None:
    if len(data) < MULTIPART_THRESHOLD:
        _s3_call(_s3().put_object, url, Body=data)
        return
    from boto3.s3.transfer import TransferConfig

    # s3transfer aborts the multipart upload if any part fails: nothing becomes visible
    cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE,
                         max_concurrency=4)

    def upload_fileobj(Bucket: str, Key: str) -> None:  # a retry starts a new upload from byte 0
        _s3().upload_fileobj(io.BytesIO(data), Bucket, Key, Config=cfg)
    _s3_call(upload_fileobj, url)


def _s3_pages(url: str, op: str, **kw) -> list[dict]:
    """Every page of a listing; a transient failure restarts the listing (pages are not
    resumable across a server restart)."""
    bucket, prefix = _split(url.rstrip("/") + "/")

    def pages() -> list[dict]:
        paginator = _s3().get_paginator(op)
        return list(paginator.paginate(Bucket=bucket, Prefix=prefix,
                                       PaginationConfig={"PageSize": LIST_PAGE_SIZE}, **kw))
    return _retrying(op, url, pages)


# ---------------------------------------------------------------------------- API

def exists(url: str) -> bool:
    if is_s3(url):
        try:
            _s3_call(_s3().head_object, url)
            return True
        except FileNotFoundError:
            return False
    if is_http(url):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30):
                return True
        except OSError:
            return False
    return Path(url).exists()


def read_bytes(url: str) -> bytes:
    if is_s3(url):
        bucket, key = _split(url)

        def get() -> bytes:  # a body that drops mid-read is fetched again, whole
            body = _s3().get_object(Bucket=bucket, Key=key)["Body"]
            try:
                return body.read()
            finally:
                body.close()
        return _retrying("get_object", url, get)
    with open_read(url) as f:
        return f.read()


def open_read(url: str):
    """A binary file-like object for reading (streamed for s3 and https, resumed where a
    dropped connection left it: `ResumableRead`)."""
    if is_s3(url):
        return io.BufferedReader(ResumableRead(url, _s3_open_at), STREAM_BUFFER)
    if is_http(url):
        return io.BufferedReader(ResumableRead(url, _http_open_at), STREAM_BUFFER)
    try:
        return open(url, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {url}") from None


STREAM_BUFFER = 1 << 20
RESUME_ATTEMPTS = 5   # consecutive failed reads at one byte before the read fails


def _dropped() -> tuple[type[BaseException], ...]:
    """What a read raises when its connection dropped or stalled (socket errors, a body cut
    short, urllib3's and botocore's wrappers of both)."""
    import http.client

    kinds: list[type[BaseException]] = [OSError, http.client.HTTPException]
    try:
        import urllib3.exceptions
        from botocore.exceptions import BotoCoreError

        kinds += [urllib3.exceptions.HTTPError, BotoCoreError]
    except ImportError:  # boto3 is a dependency; this only keeps https reads importable alone
        pass
    return tuple(kinds)


class ResumableRead(io.RawIOBase):
    """A streamed GET that survives a dropped connection. A worker holds its shard's stream
    open while it computes (and a prefetched shard's while it computes the one before), so
    the connection can sit idle long enough for a server or proxy to close it. After a failed
    read the rest of the object is asked for again from the byte reached — a ranged GET
    pinned to the first response's ETag, so an object replaced meanwhile fails instead of
    mixing two versions — at most RESUME_ATTEMPTS times in a row.

    `open_at(url, offset, etag)` → (body with read(n), etag or None, the body's length or
    None). A body that ends before its announced length counts as dropped too (http.client's
    read(n) returns b"" then, without an error)."""

    def __init__(self, url: str, open_at: Callable[[str, int, str | None], tuple]):
        self.url, self._open_at, self.pos = url, open_at, 0
        self._body, self._etag, length = open_at(url, 0, None)
        self._end = length
        self._errors = _dropped()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        failures = 0
        while True:
            try:
                data = self._body.read(len(buf))
                if data or not buf or self._end is None or self.pos >= self._end:
                    break
                raise ConnectionError(f"the body ended {self._end - self.pos} bytes short")
            except self._errors as err:
                failures += 1
                if failures > RESUME_ATTEMPTS:
                    raise StorageError(f"{self.url}: reading failed {failures} times at byte {self.pos}: "
                                       f"{err}") from err
                delay = min(5.0, RETRY_BASE_S * 2 ** (failures - 1))
                log.warning("%s: read failed at byte %d (%s); resuming in %.1fs", self.url, self.pos,
                            type(err).__name__, delay)
                self._close_body()
                time.sleep(delay)
                try:
                    self._body, _, length = self._open_at(self.url, self.pos, self._etag)
                    self._end = None if length is None else self.pos + length
                except StorageError:
                    raise
                except OSError as reopen:
                    raise StorageError(f"{self.url}: cannot resume at byte {self.pos}: {reopen}") from reopen
        n = len(data)
        buf[:n] = data
        self.pos += n
        return n

    def _close_body(self) -> None:
        try:
            self._body.close()
        except Exception:  # noqa: BLE001 - a dead connection may fail to close; it is dropped anyway
            pass

    def close(self) -> None:
        if not self.closed:
            self._close_body()
        super().close()


def _s3_open_at(url: str, offset: int, etag: str | None) -> tuple:
    from botocore.exceptions import ClientError

    kw = {"Range": f"bytes={offset}-"} if offset else {}
    if etag:
        kw["IfMatch"] = etag
    try:
        r = _s3_call(_s3().get_object, url, **kw)
    except StorageError as err:
        code = err.__cause__.response.get("Error", {}).get("Code") if isinstance(err.__cause__, ClientError) else ""
        if code == "InvalidRange":  # the connection dropped exactly at the end: nothing is left
            return io.BytesIO(b""), etag, 0
        if code == "PreconditionFailed":
            raise StorageError(f"{url}: the object changed while it was read (ETag {etag})") from err
        raise
    return r["Body"], r.get("ETag"), r.get("ContentLength")


def _http_open_at(url: str, offset: int, etag: str | None) -> tuple:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    if etag and offset:
        headers["If-Match"] = etag
    r = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    if offset and r.status != 206:
        r.close()
        raise StorageError(f"{url}: the server does not resume at byte {offset} (HTTP {r.status}, no range support)")
    length = r.headers.get("Content-Length")
    return r, r.headers.get("ETag"), int(length) if length is not None and length.isdigit() else None


def put_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` atomically: readers see the old object or the whole new one."""
    if is_s3(url):
        _s3_put(url, data)
        return
    if is_http(url):
        raise StorageError(f"cannot write to {url}: http(s) is read-only")
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{uuid.uuid4().hex[:8]}.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # make the rename itself durable
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def put_text(url: str, text: str) -> None:
    put_bytes(url, text.encode())


def read_text(url: str) -> str:
    return read_bytes(url).decode()


def listdir(url: str) -> list[str]:
    """Full URLs of the objects directly below `url` (not recursive), sorted; [] if none."""
    if is_s3(url):
        bucket, _ = _split(url)
        out = []
        for page in _s3_pages(url, "list_objects_v2", Delimiter="/"):
            out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return sorted(out)
    if is_http(url):
        raise StorageError(f"cannot list {url}: http(s) has no listing")
    p = Path(url)
    return sorted(str(c) for c in p.iterdir() if c.is_file()) if p.is_dir() else []


def remove(url: str) -> None:
    """Delete an object or file; a missing one is not an error."""
    if is_s3(url):
        _s3_call(_s3().delete_object, url)
    elif is_http(url):
        raise StorageError(f"cannot remove {url}: http(s) is read-only")
    else:
        Path(url).unlink(missing_ok=True)


# ---------------------------------------------------------------------------- conditional writes

def _precondition_failed(err: BaseException) -> bool:
    from botocore.exceptions import ClientError

    cause = err.__cause__
    return isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in (
        "PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _LocalLock:
    """flock on a hidden sidecar file: serialises compare-and-swap on one local file
    (processes of one host; NFS v4 forwards it to the server)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path.with_name(f".{path.name}.lock"), os.O_CREAT | os.O_RDWR, 0o644)

    def __enter__(self) -> "_LocalLock":
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def read_versioned(url: str) -> tuple[bytes, str]:
    """The object's bytes and a version token for `put_if_match` / `remove_if_match`
    (S3: the ETag; local: sha256 of the content)."""
    if is_s3(url):
        bucket, key = _split(url)

        def get() -> tuple[bytes, str]:
            resp = _s3().get_object(Bucket=bucket, Key=key)
            try:
                return resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()
        return _retrying("get_object", url, get)
    data = read_bytes(url)
    return data, _version(data)


def put_if_absent(url: str, data: bytes) -> str | None:
    """Create the object only if none exists; its version, or None if one exists. Atomic on
    local files (O_EXCL link of a complete temporary) and on S3 stores that honour
    If-None-Match (a store that ignores it overwrites: see `pipeline.run.lease`)."""
    if is_s3(url):
        try:
            return _s3_call(_s3().put_object, url, Body=data, IfNoneMatch="*")["ETag"]
        except StorageError as err:
            if _precondition_failed(err):
                return None
            raise
    if is_http(url):
        raise StorageError(f"cannot write to {url}: http(s) is read-only")
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if the name exists: the whole file appears, or nothing
        return _version(data)
    except FileExistsError:
        return None
    finally:
        tmp.unlink(missing_ok=True)


def put_if_match(url: str, data: bytes, version: str) -> str | None:
    """Replace the object only if it is still at `version` (from `read_versioned` or an
    earlier conditional put); the new version, or None if it changed or is gone."""
    if is_s3(url):
        try:
            return _s3_call(_s3().put_object, url, Body=data, IfMatch=version)["ETag"]
        except FileNotFoundError:
            return None
        except StorageError as err:
            if _precondition_failed(err):
                return None
            raise
    path = Path(url)
    with _LocalLock(path):
        try:
            if _version(path.read_bytes()) != version:
                return None
        except FileNotFoundError:
            return None
        put_bytes(url, data)
        return _version(data)


def remove_if_match(url: str, version: str) -> bool:
    """Delete the object only if it is still at `version`; False otherwise."""
    if is_s3(url):
        try:
            _s3_call(_s3().delete_object, url, IfMatch=version)
            return True
        except FileNotFoundError:
            return False
        except StorageError as err:
            if _precondition_failed(err):
                return False
            raise
    path = Path(url)
    with _LocalLock(path):
        try:
            if _version(path.read_bytes()) != version:
                return False
        except FileNotFoundError:
            return False
        path.unlink()
        return True


def remove_stale_temporaries(url: str) -> int:
    """Delete leftovers of interrupted commits below a directory / prefix; returns how many.

    Local: the `.name.*.tmp` files of put_bytes. S3: unfinished multipart uploads directly
    below the prefix (invisible to readers, but they hold storage until aborted). Call it
    only when no writer can be active there (the driver does, before starting workers).
    """
    if is_s3(url):
        bucket, _ = _split(url)
        n = 0
        for page in _s3_pages(url, "list_multipart_uploads", Delimiter="/"):
            for up in page.get("Uploads", []):
                try:
                    _s3().abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                    n += 1
                except Exception:  # noqa: BLE001 - already completed or aborted by someone else
                    pass
        return n
    if is_http(url) or not Path(url).is_dir():
        return 0
    n = 0
    for p in Path(url).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n
