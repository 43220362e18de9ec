"""Durable writes to a local filesystem: the two steps every writer here needs.

Blob commits and the audit log both promise that what they acknowledged
survives a crash, which takes a write that loops until the kernel took every
byte, an fsync of the file, and an fsync of the directory a new name went into.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (os.write may take fewer), then fsync the file."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """Make a new or renamed directory entry durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
