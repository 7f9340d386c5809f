"""The memory-ordering assumption of the shared-memory protocols, and the start-up check that enforces it.

The slot table's seqlock and readiness counts, its flags (``waiting_for_slot``, ``store_filled``) and the
hidden-state exchange's seqlock are plain 8-byte numpy stores and loads in shared memory, with no fences. They are
correct only where the hardware keeps stores in program order as seen by other cores, and loads in program order
(x86-64's total store order): e.g. the loader's copy of a chunk is visible before the ``slot_ready`` store that
publishes it, and the coordinator's ``slot_expert``/``slot_ready`` stores are visible no later than the
``slot_seq`` bump after them. Store-to-load reordering (x86's store buffer) is allowed and is not relied on: where a
flag and a pin may cross, the coordinator retries on a timer.

Weakly ordered CPUs (aarch64, e.g. Grace Hopper hosts; POWER; RISC-V) may reorder those stores and loads, and a
reader could then compute with a torn expert. Until the protocols carry explicit fences, the runtime refuses to
start there.
"""

from __future__ import annotations

import platform

ORDERED_MACHINES = frozenset({"x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"})
"""``platform.machine()`` names (lower-cased) of CPUs with total store order."""


class UnsupportedArchitecture(RuntimeError):
    """The host CPU does not keep the store and load order the shared-memory protocols rely on."""


def require_ordered_stores(machine: str | None = None) -> None:
    """Raise ``UnsupportedArchitecture`` unless ``machine`` (default: this host's ``platform.machine()``) is x86."""
    name = platform.machine() if machine is None else machine
    if name.lower() not in ORDERED_MACHINES:
        raise UnsupportedArchitecture(
            f"this host's CPU is {name!r}: promoe's shared memory (the slot table's seqlock and flags, the "
            "hidden-state exchange) relies on x86-64's store and load ordering, which this CPU does not guarantee. "
            "Run it on an x86-64 host (shm/ordering.py)")
