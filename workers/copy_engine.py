"""How the loader moves one chunk from the host store into a cache slot: the only part of the loader that differs
between devices.

The loader hands the engine one chunk at a time (``submit``) and asks which submitted chunks have completed
(``completed``); it publishes readiness in the slot table only for completed chunks, in submission order.

- ``CpuCopyEngine``: a memcpy between shared segments, optionally paced to an emulated link. Synchronous: a chunk
  has completed when ``submit`` returns, so the loader publishes it in the same step, as before.
- ``CudaCopyEngine``: ``cudaMemcpyAsync`` from the pinned host store into the GPU slots on the loader's own stream,
  one CUDA event recorded after each chunk. At most ``max_in_flight`` chunks are on the stream at once (two: the
  next chunk is queued while the current one crosses the link, so the link never idles between chunks, and a
  preemption or reorder still takes effect within two chunks). ``completed`` polls the events (``query``, never
  blocking the stream); only when the loader has nothing else to do does it wait on the oldest event.

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch

from protocol.ids import ExpertId, SlotId
from shm.cache_slots import SlotArray
from shm.expert_store import HostExpertStore

log = logging.getLogger(__name__)

CUDA_HOST_REGISTER_PORTABLE = 1
"""``cudaHostRegisterPortable``: the pinning is seen by every CUDA context, not only the registering one."""


@dataclass
class CopyTicket:
    """One chunk handed to an engine; ``token`` is the loader's own bookkeeping, returned as given."""

    expert: ExpertId
    slot: SlotId
    chunk: int
    token: object
    nbytes: int = 0
    """Bytes that crossed the link (set by ``submit``)."""
    copy_ns: int = 0
    """Time the link spent on this chunk (set once completed: CPU, the paced copy; CUDA, from when the stream
    reached it, i.e. its submission or the previous chunk's completion, to when its completion was seen)."""


class CopyEngine(Protocol):
    max_in_flight: int
    """Chunks that may be submitted and not yet completed."""

    def submit(self, ticket: CopyTicket) -> None:
        """Start copying ``ticket``'s chunk into its slot."""

    def completed(self, wait: bool = False) -> list[CopyTicket]:
        """Submitted chunks whose copy has completed, oldest first; ``wait``: block until at least the oldest
        in-flight chunk has completed (if any is in flight)."""

    def in_flight(self) -> int:
        """Chunks submitted and not yet returned by ``completed``."""

    def close(self) -> None:
        """Finish what is in flight and release what the engine holds."""


class CpuCopyEngine:
    """Copies chunks between shared segments, optionally paced to an emulated link bandwidth."""

    max_in_flight = 1

    def __init__(self, store: HostExpertStore, slots: SlotArray, link_gbps: float | None) -> None:
        self.store = store
        self.slots = slots
        self.ns_per_byte = None if not link_gbps else 1.0 / link_gbps  # 1 GB/s = 1 byte/ns
        self.itemsize = store.layout.store_itemsize
        self._done: list[CopyTicket] = []

    def copy_chunk(self, expert: ExpertId, slot: SlotId, chunk: int) -> int:
        """Copy one chunk now; returns the bytes that crossed the (emulated) link."""
        start_ns = time.perf_counter_ns()
        src = self.store.chunk(expert, chunk)  # [chunk_numel], storage dtype (quantized: bytes)
        self.slots.chunk(slot, chunk).copy_(src)  # converts to the compute dtype if they differ
        nbytes = src.numel() * self.itemsize
        if self.ns_per_byte is not None:
            deadline_ns = start_ns + int(nbytes * self.ns_per_byte)
            remaining_s = (deadline_ns - time.perf_counter_ns()) / 1e9
            if remaining_s > 200e-6:
                time.sleep(remaining_s - 100e-6)
            while time.perf_counter_ns() < deadline_ns:
                pass
        return nbytes

    def submit(self, ticket: CopyTicket) -> None:
        started_ns = time.perf_counter_ns()
        ticket.nbytes = self.copy_chunk(ticket.expert, ticket.slot, ticket.chunk)
        ticket.copy_ns = time.perf_counter_ns() - started_ns
        self._done.append(ticket)

    def completed(self, wait: bool = False) -> list[CopyTicket]:
        done, self._done = self._done, []
        return done

    def in_flight(self) -> int:
        return len(self._done)

    def close(self) -> None:
        self._done.clear()


class PinnedRegion:
    """Host memory registered with CUDA as pinned (page-locked) for as long as this object is open.

    Registering the shared-memory store in place means host-to-device copies DMA straight from it, with no staging
    through a bounce buffer. ``cudaHostRegisterPortable`` makes the pinning valid for every CUDA context.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("only a contiguous host tensor can be registered")
        self.ptr = tensor.data_ptr()
        self.nbytes = tensor.numel() * tensor.element_size()
        started = time.perf_counter()
        err = int(torch.cuda.cudart().cudaHostRegister(self.ptr, self.nbytes, CUDA_HOST_REGISTER_PORTABLE))
        if err != 0:
            raise RuntimeError(f"cudaHostRegister of {self.nbytes / 1e9:.2f} GB failed with cudaError {err} "
                               "(is the locked-memory limit, ulimit -l, large enough?)")
        self.registered = True
        log.info("host store registered as pinned memory: %.2f GB in %.2f s", self.nbytes / 1e9,
                 time.perf_counter() - started)

    def close(self) -> None:
        if self.registered:
            self.registered = False
            err = int(torch.cuda.cudart().cudaHostUnregister(self.ptr))
            if err != 0:
                log.error("cudaHostUnregister failed with cudaError %d", err)


class CudaCopyEngine:
    """Copies pinned host chunks into GPU slots on the loader's own stream; completion is read off CUDA events."""

    def __init__(self, store: HostExpertStore, slots: SlotArray, max_in_flight: int = 2) -> None:
        if store.layout.store_row_dtype != store.layout.slot_row_dtype:
            log.warning("store dtype %s differs from slot dtype %s: every copy converts on the device",
                        store.layout.storage_dtype, store.layout.compute_dtype)
        self.store = store
        self.slots = slots
        self.max_in_flight = max_in_flight
        self.device = slots.slots.device
        self.itemsize = store.layout.store_itemsize
        self.pinned = PinnedRegion(store.experts)
        self.stream = torch.cuda.Stream(self.device)
        self._free_events: list[torch.cuda.Event] = []
        self._in_flight: deque[tuple[CopyTicket, torch.cuda.Event]] = deque()
        self._last_done_ns = 0

    def submit(self, ticket: CopyTicket) -> None:
        src = self.store.chunk(ticket.expert, ticket.chunk)  # [chunk_numel], pinned host
        dst = self.slots.chunk(ticket.slot, ticket.chunk)  # [chunk_numel], GPU
        event = self._free_events.pop() if self._free_events else torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)  # cudaMemcpyAsync on self.stream: the host does not wait
            event.record(self.stream)  # completes when this copy (and every earlier one on the stream) has
        ticket.nbytes = src.numel() * self.itemsize
        ticket.copy_ns = time.perf_counter_ns()  # submitted at; made a duration once completed
        self._in_flight.append((ticket, event))

    def completed(self, wait: bool = False) -> list[CopyTicket]:
        done = []
        if wait and self._in_flight:
            self._in_flight[0][1].synchronize()  # waits for the host, never for the stream
        # one stream: events complete in the order they were recorded, so stop at the first one still pending
        while self._in_flight and self._in_flight[0][1].query():
            ticket, event = self._in_flight.popleft()
            self._free_events.append(event)
            done_ns = time.perf_counter_ns()
            ticket.copy_ns = done_ns - max(ticket.copy_ns, self._last_done_ns)
            self._last_done_ns = done_ns
            done.append(ticket)
        return done

    def in_flight(self) -> int:
        return len(self._in_flight)

    def close(self) -> None:
        try:
            self.stream.synchronize()  # no DMA may still read the store once it is unregistered and unmapped
        finally:
            self._in_flight.clear()
            self.pinned.close()
