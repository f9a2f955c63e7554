"""Injected failures for resilience tests (config `faults:`): a matching shard raises, kills
its worker process, or hangs, exactly `times` times across processes and retries."""
from __future__ import annotations

import logging
import os
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Sequence

from pipeline.config import FaultConfig

log = logging.getLogger(__name__)


def inject(faults: Sequence[FaultConfig], sid: str) -> None:
    """Fail now if a configured fault for this shard has failures left."""
    for f in faults:
        if not fnmatch(sid, f.shard):
            continue
        Path(f.marker_dir).mkdir(parents=True, exist_ok=True)
        for n in range(f.times):
            try:  # O_EXCL: each of the `times` failures is claimed by exactly one attempt
                os.close(os.open(Path(f.marker_dir, f"{sid}.{f.mode}.{n}"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
            log.warning("injected fault %s on shard %s", f.mode, sid)
            if f.mode == "raise":
                raise RuntimeError(f"injected fault on shard {sid}")
            if f.mode == "exit":
                os._exit(17)
            time.sleep(10**6)  # hang until the driver's deadline kills this worker
