"""A seqlock record in shared memory: one writer, any readers, no locks.

A record is a header of int64 words ``[seq, field_1, ..., field_n]`` beside the data it describes. The writer makes
``seq`` odd, writes the data and the fields, then makes ``seq`` even again; a reader accepts what it copied only if
``seq`` was even and its key fields matched before the copy and ``seq`` is unchanged after it. A record overwritten
while it was read is refused, never returned torn.

No fences: this relies on x86-64 keeping the writer's stores and the reader's loads in program order
(``shm/ordering.py``; the runtime refuses to start on CPUs without that ordering).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def publish(header: np.ndarray, fields: Sequence[int], write_data: Callable[[], object]) -> None:
    """Write a record: ``write_data()`` and then ``fields`` into ``header[1:]``, between an odd and an even
    ``header[0]``."""
    header[0] += 1  # odd: being written
    write_data()
    header[1: 1 + len(fields)] = fields
    header[0] += 1  # even: complete


def read(header: np.ndarray, key: Sequence[int], copy_data: Callable[[], T]) -> T | None:
    """``copy_data()`` (which must copy out of shared memory) if the record is complete, its first fields equal
    ``key`` and it was not rewritten during the copy; else None."""
    seq = int(header[0])
    if seq % 2 or any(int(header[1 + i]) != k for i, k in enumerate(key)):
        return None
    data = copy_data()
    return data if int(header[0]) == seq else None
