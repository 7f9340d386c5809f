"""Create, attach and unlink POSIX shared-memory segments without the resource tracker's surprises.

On Python < 3.13 ``SharedMemory(create=False)`` registers the segment with the process's resource tracker, which
unlinks it when that process exits: a worker that merely attached would destroy the runtime's memory. Attachers
therefore unregister at once. The creator keeps its registration, so that if it is killed the tracker still
unlinks what it created.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterable
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import cast

from shm import SEGMENT_PREFIX

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
TORCH_SHM_PREFIX = "torch_"
"""torch names its shared-memory files ``/dev/shm/torch_<pid>_<random>_<counter>`` after the process that created
them (``at::NewProcessWideShmHandle``); among them the CUDA IPC reference counters of exported storages."""
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
"""Linux's value where Python's mmap module does not name it (before 3.13)."""


def segment_name(run_id: str, what: str) -> str:
    return f"{SEGMENT_PREFIX}{run_id}_{what}"


class Segment:
    """One named shared-memory segment; ``owner`` segments are unlinked by ``unlink``."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self._shm = shm
        self.owner = owner
        self.name = shm.name
        self.nbytes = shm.size

    @classmethod
    def create(cls, name: str, nbytes: int) -> Segment:
        if not name.startswith(SEGMENT_PREFIX):
            raise ValueError(f"segment name {name!r} must start with {SEGMENT_PREFIX!r}")
        shm = shared_memory.SharedMemory(name=name, create=True, size=max(nbytes, 1))
        log.debug("created segment %s (%d bytes)", name, nbytes)
        return cls(shm, owner=True)

    @classmethod
    def private(cls, nbytes: int) -> Segment:
        """Memory of this process alone, shaped like a segment (models and tests): no name in /dev/shm, nothing to
        unlink."""
        return cls(cast(shared_memory.SharedMemory, _PrivateMemory(max(nbytes, 1))), owner=False)

    @classmethod
    def attach(cls, name: str) -> Segment:
        shm = shared_memory.SharedMemory(name=name, create=False)
        # Python < 3.13 registered the attach: undo it, or this process's exit would unlink the segment.
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return cls(shm, owner=False)

    @property
    def buf(self) -> memoryview:
        buf = self._shm.buf
        assert buf is not None, f"segment {self.name} is closed"
        return buf

    def populate(self, offset: int, nbytes: int) -> bool:
        """Allocate and map the pages of ``[offset, offset + nbytes)`` for writing in one call (Linux 5.14+
        ``MADV_POPULATE_WRITE``): far cheaper than faulting them in one by one inside a large ``read``. Returns
        False where the kernel lacks it (nothing else changes: the pages then fault in as usual)."""
        page = mmap.PAGESIZE
        start = offset - offset % page
        end = min(self.nbytes, -(-(offset + nbytes) // page) * page)
        try:
            self._shm._mmap.madvise(MADV_POPULATE_WRITE, start, end - start)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Drop this process's mapping. Views into it must be gone; if not, the OS unmaps at exit."""
        try:
            self._shm.close()
        except BufferError:
            log.debug("segment %s still has views; left mapped until exit", self.name)

    def unlink(self) -> None:
        if not self.owner:
            raise RuntimeError(f"segment {self.name} is attached, not owned: only its creator unlinks it")
        try:
            self._shm.unlink()  # also unregisters it from the resource tracker
        except FileNotFoundError:
            log.warning("segment %s was already gone", self.name)


class _PrivateMemory:
    """What ``Segment`` uses of ``SharedMemory``, over an anonymous private mapping."""

    def __init__(self, nbytes: int) -> None:
        self._mmap = mmap.mmap(-1, nbytes)
        self.buf: memoryview | None = memoryview(self._mmap)
        self.name = "private"
        self.size = nbytes

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()
            self.buf = None
        self._mmap.close()


def leftover_segments(run_id: str | None = None) -> list[str]:
    """Names in /dev/shm that belong to the runtime (to one run if ``run_id`` is given)."""
    prefix = SEGMENT_PREFIX if run_id is None else segment_name(run_id, "")
    if not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


def _unlink_all(names: Iterable[str]) -> list[str]:
    """Remove these names from /dev/shm; those already gone are skipped. Returns the names removed."""
    removed = []
    for name in names:
        try:
            os.unlink(SHM_DIR / name)
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def unlink_leftovers(run_id: str) -> list[str]:
    """Last-resort cleanup by name, for a run whose owner died without unlinking."""
    return _unlink_all(leftover_segments(run_id))


def torch_files_of(pids: Iterable[int]) -> list[str]:
    """torch's shared-memory files in /dev/shm created by any of ``pids`` (see ``TORCH_SHM_PREFIX``)."""
    prefixes = tuple(f"{TORCH_SHM_PREFIX}{pid}_" for pid in pids)
    if not prefixes or not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefixes))


def unlink_torch_files(pids: Iterable[int]) -> list[str]:
    """Remove torch's shared-memory files of processes that are gone (after ``kill -9`` torch cannot remove its CUDA
    IPC reference counters itself). A pid that names a live process now is skipped: it is no longer the process
    whose files were meant, or it is still running and owns them."""
    gone = [pid for pid in pids if not Path(f"/proc/{pid}").exists()]
    return _unlink_all(torch_files_of(gone))
