"""One URL API for local paths and s3:// (boto3), with an atomic commit for both.

Local: write to a unique temporary name in the target directory, fsync, os.replace.
S3: a single PUT is atomic for readers (an object is visible whole or not at all).
https:// is readable (shards) but not writable.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse


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


def _s3():
    """A boto3 client; the endpoint comes from AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 if set."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    key = (endpoint, os.getpid())
    if key not in _clients:
        _clients[key] = boto3.client("s3", endpoint_url=endpoint)
    return _clients[key]


def _split(url: str) -> tuple[str, str]:
    p = urlparse(url)
    return p.netloc, p.path.lstrip("/")


def _s3_call(fn, url: str, **kw):
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split(url)
    try:
        return fn(Bucket=bucket, Key=key, **kw)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(url) from None
        raise StorageError(f"{url}: {err}") from err
    except BotoCoreError as err:
        raise StorageError(f"{url}: {err}") from err


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
    with open_read(url) as f:
        return f.read()


def open_read(url: str):
    """A binary file-like object for reading (streamed for s3 and https)."""
    if is_s3(url):
        return _s3_call(_s3().get_object, url)["Body"]
    if is_http(url):
        return urllib.request.urlopen(url, timeout=60)
    try:
        return open(url, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {url}") from None


def put_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` atomically: readers see the old object or the whole new one."""
    if is_s3(url):
        _s3_call(_s3().put_object, url, Body=data)
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
    """Full URLs of the objects directly below `url` (not recursive), sorted."""
    if is_s3(url):
        bucket, prefix = _split(url.rstrip("/") + "/")
        out = []
        for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return sorted(out)
    if is_http(url):
        raise StorageError(f"cannot list {url}: http(s) has no listing")
    p = Path(url)
    return sorted(str(c) for c in p.iterdir() if c.is_file()) if p.is_dir() else []


def remove(url: str) -> None:
    if is_s3(url):
        _s3_call(_s3().delete_object, url)
    else:
        Path(url).unlink(missing_ok=True)


def remove_stale_temporaries(url: str) -> int:
    """Delete leftovers of interrupted local commits in a directory; returns how many."""
    if is_s3(url) or not Path(url).is_dir():
        return 0
    n = 0
    for p in Path(url).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def local_copy(url: str, directory: str) -> str:
    """A local path holding the object's bytes (the object itself when already local)."""
    if not (is_s3(url) or is_http(url)):
        return url
    dest = Path(directory, basename(url))
    with open_read(url) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return str(dest)


def iter_lines(url: str) -> Iterator[str]:
    yield from read_text(url).splitlines()
