"""What data a job ran on: one identity per shard, recorded in job.json beside the config hash.

A job's results are a function of its config *and* its data, so an output that holds results
for some shards refuses to continue with others (a shard added, removed, or with other
bytes under the same name). A shard's identity is the cheapest trustworthy one:

  - the shard index's sha256 and size (written by `advpure make-shards` and by every stage
    that writes shards): nothing is read from the shards themselves;
  - else `storage.identities`: the S3 ETag and size from one listing per folder, an https
    ETag and Content-Length from a HEAD, or for a local file a sha256 of its size and its
    first and last MiB.

None of these depend on modification times, so a copied or touched shard still resumes.
Two identities agree when every field both have agrees (an index added later, or lost,
leaves the size to compare). Pure storage logic: no Ray, no torch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from pipeline.io import shards, storage

log = logging.getLogger(__name__)
FIELDS = ("sha256", "etag", "ends_sha256", "bytes")


def from_index(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """A shard's identity from its index entry (advpure index or wids shard list), if it has a checksum."""
    if not entry or not entry.get("sha256"):
        return None
    size = entry.get("bytes", entry.get("filesize"))
    return {"sha256": entry["sha256"], **({"bytes": int(size)} if size is not None else {})}


def index_entries(urls: Sequence[str], index_url: str | None = None) -> dict[str, dict[str, Any] | None]:
    """{shard URL: its entry} from the index beside each shard (or the given index, which
    must be readable); None where no index names it, or the index beside it is not ours."""
    cache: dict[str, dict[str, dict[str, Any]]] = {}
    out: dict[str, dict[str, Any] | None] = {}
    for u in urls:
        iu = index_url or shards.index_url_for(u)
        if iu not in cache:
            try:
                cache[iu] = shards.load_index(iu)
            except shards.ShardError as err:
                if index_url is not None:
                    raise
                log.warning("%s; identifying the shards by their files instead", err)
                cache[iu] = {}
        out[u] = cache[iu].get(storage.basename(u))
    return out


def shard_identities(urls: Sequence[str], sids: Sequence[str],
                     entries: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """{shard id: identity}: from the index entries where they hold a checksum, else from
    the objects (only those are listed or read)."""
    found = {u: from_index(entries.get(u)) for u in urls}
    rest = [u for u in urls if found[u] is None]
    found.update(storage.identities(rest) if rest else {})
    return {sid: dict(found[u] or {}) for u, sid in zip(urls, sids)}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True unless a field both identities have differs."""
    return all(a[k] == b[k] for k in FIELDS if k in a and k in b)


@dataclass
class DataDiff:
    added: list[str]
    removed: list[str]
    changed: list[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self, most: int = 5) -> str:
        parts = []
        for what, sids in (("changed (other bytes under the same name)", self.changed),
                           ("added", self.added), ("removed", self.removed)):
            if sids:
                more = f" and {len(sids) - most} more" if len(sids) > most else ""
                parts.append(f"{len(sids)} shard(s) {what}: {', '.join(sids[:most])}{more}")
        return "; ".join(parts)


def diff(before: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> DataDiff:
    """How the data of `now` ({shard id: identity}) differs from what an output was made from."""
    return DataDiff(added=sorted(set(now) - set(before)), removed=sorted(set(before) - set(now)),
                    changed=sorted(s for s in set(now) & set(before) if not same(before[s], now[s])))
