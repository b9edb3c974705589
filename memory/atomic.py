"""Atomic file writes: temp file beside the target, fsync, os.replace, fsync the folder.

A reader sees the old file or the new one, never half of either, and the switch survives
a crash (DESIGN.md, "Atomic switches").
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_bytes_atomically(path: Path, data: bytes | memoryview, mode: int | None = None,
                           parents: bool = True, sync_dir: bool = True, sync: bool = True) -> None:
    """Replace `path` with `data` in one step; `mode` sets its permission bits before the
    switch, so no reader sees the file with the wrong ones. `parents=False`: the caller
    knows the folder exists; `sync_dir=False`: the caller can live with the switch being
    undone by a power cut (the file's content is durable before it has its name);
    `sync=False`: nothing is fsynced, and the caller checks what it reads back (after a
    power cut the file may be there with its name but not its content)."""
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            if sync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync and sync_dir:
        fsync_dir(path.parent)


def write_json_atomically(path: Path, obj) -> None:
    """Replace `path` with `obj` as indented JSON."""
    write_bytes_atomically(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
