"""The loader process (``promoe::loader``): fills the host store from the checkpoint, then copies expert chunks into
cache slots in the order of its chunk queue, reading Load/Preempt/Reorder between chunks.

On the CPU path a copy is a memcpy between shared segments, paced to ``link_gbps`` when given so that a PCIe link
is emulated. Readiness is published in the slot table after each chunk's copy has completed.
"""

from __future__ import annotations

import logging
import time

import torch
import zmq

from models.checkpoint import open_checkpoint
from models.streaming import fill_store as stream_experts
from protocol.codec import dispatch
from protocol.config import RuntimeConfig
from protocol.ids import ExpertId, SlotId
from protocol.messages import (
    ExpertLoaded,
    LoadExpert,
    LoadsPreempted,
    Message,
    Ping,
    PingAnswered,
    Preempt,
    Reorder,
)
from shm.cache_slots import CacheSlots
from shm.expert_store import HostExpertStore
from shm.layout import DTYPES
from shm.segment import Segment
from shm.slot_table import SlotTable
from workers.bootstrap import IDLE_POLL_S, Inbox, WorkerSockets, now_ns, run_worker, send
from workers.chunk_queue import ChunkQueue, QueuedLoad

log = logging.getLogger(__name__)


class CpuCopyEngine:
    """Copies chunks between shared segments, optionally paced to an emulated link bandwidth."""

    def __init__(self, store: HostExpertStore, slots: CacheSlots, link_gbps: float | None) -> None:
        self.store = store
        self.slots = slots
        self.ns_per_byte = None if not link_gbps else 1.0 / link_gbps  # 1 GB/s = 1 byte/ns
        self.itemsize = DTYPES[store.layout.storage_dtype].itemsize

    def copy_chunk(self, expert: ExpertId, slot: SlotId, chunk: int) -> int:
        """Copy one chunk; returns the bytes that crossed the (emulated) link."""
        start_ns = time.perf_counter_ns()
        src = self.store.chunk(expert, chunk)  # [chunk_numel], storage dtype
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


class Loader:
    def __init__(self, cfg: RuntimeConfig, table: SlotTable, engine: CpuCopyEngine, inbox: Inbox,
                 send_to_coordinator: zmq.Socket) -> None:
        self.cfg = cfg
        self.table = table
        self.engine = engine
        self.inbox = inbox
        self.send_to_coordinator = send_to_coordinator
        self.queue = ChunkQueue()
        self.n_chunks = cfg.layout.n_chunks
        self._load_started_ns: dict[int, int] = {}
        self._load_nbytes: dict[int, int] = {}
        self.handlers: dict[type[Message], object] = {
            LoadExpert: self.on_load_expert,
            Preempt: self.on_preempt,
            Reorder: self.on_reorder,
            Ping: self.on_ping,
        }

    def on_load_expert(self, msg: LoadExpert) -> None:
        self.queue.push(QueuedLoad.from_message(msg, self.n_chunks))
        self._load_started_ns[msg.load_id] = now_ns()
        self._load_nbytes[msg.load_id] = 0

    def on_preempt(self, msg: Preempt) -> None:
        dropped = self.queue.preempt(msg.load_ids)
        for load_id, _ in dropped:
            self._load_started_ns.pop(load_id, None)
            self._load_nbytes.pop(load_id, None)
        if dropped:
            send(self.send_to_coordinator, LoadsPreempted(
                load_ids=[d[0] for d in dropped], chunks_done=[d[1] for d in dropped]))

    def on_reorder(self, msg: Reorder) -> None:
        self.queue.reorder(msg.load_ids)

    def on_ping(self, msg: Ping) -> None:
        send(self.send_to_coordinator, PingAnswered(role="loader", nonce=msg.nonce, sent_ns=msg.sent_ns))

    def drain_inbox(self, timeout_s: float) -> None:
        msg = self.inbox.poll(timeout_s)
        while msg is not None:
            try:
                dispatch(self.handlers, msg)  # type: ignore[arg-type]
            except ValueError as exc:
                log.error("rejected %s: %s", type(msg).__name__, exc)
            msg = self.inbox.poll(0)

    def step(self) -> bool:
        """Copy one chunk if one is queued; returns False when idle."""
        item = self.queue.pop_chunk()
        if item is None:
            return False
        load, chunk = item
        if self.table.slot_seq[load.slot] != load.seq:  # checked before copying: never write a reassigned slot
            log.warning("slot %d was reassigned under load %d; dropping it", load.slot, load.load_id)
            self.queue.preempt([load.load_id])
            self._load_started_ns.pop(load.load_id, None)
            self._load_nbytes.pop(load.load_id, None)
            return True
        nbytes = self.engine.copy_chunk(load.expert, load.slot, chunk)
        self._load_nbytes[load.load_id] = self._load_nbytes.get(load.load_id, 0) + nbytes
        self.table.publish_ready(load.slot, load.seq, chunk + 1)
        if chunk + 1 == load.n_chunks:
            started = self._load_started_ns.pop(load.load_id, now_ns())
            send(self.send_to_coordinator, ExpertLoaded(
                load_id=load.load_id, expert=load.expert, slot=load.slot, seq=load.seq,
                nbytes=self._load_nbytes.pop(load.load_id, nbytes), copy_ns=now_ns() - started))
        return True

    def serve(self) -> None:
        while True:
            self.drain_inbox(0)  # between two chunks: new loads, preemptions, reorders
            if not self.step():
                self.drain_inbox(IDLE_POLL_S)


def fill_store(cfg: RuntimeConfig, store: HostExpertStore) -> None:
    """Read every expert straight from the checkpoint's safetensors files into the host store (models.streaming)."""
    report = stream_experts(open_checkpoint(cfg.checkpoint), cfg.layout, store)
    log.info("host store filled: %d experts, %.1f MB in %.2f s (%.2f GB/s)", cfg.layout.n_experts,
             report.nbytes / 1e6, report.seconds, report.nbytes / 1e9 / max(report.seconds, 1e-9))


def serve(cfg: RuntimeConfig, sockets: WorkerSockets) -> None:
    torch.set_num_threads(1)
    lay = cfg.layout
    store = HostExpertStore(Segment.attach(cfg.segment("store")), lay)
    slots = CacheSlots(Segment.attach(cfg.segment("slots")), lay)
    table = SlotTable(Segment.attach(cfg.segment("table")), lay.n_slots, lay.n_experts, lay.n_chunks, init=False)
    try:
        fill_store(cfg, store)
        loader = Loader(cfg, table, CpuCopyEngine(store, slots, cfg.link_gbps), sockets.inbox,
                        sockets.send_to_coordinator)
        sockets.announce_ready()
        loader.serve()
    finally:
        store.close()
        slots.close()
        table.close()


def main(argv: list[str] | None = None) -> None:
    run_worker("loader", argv, serve)


if __name__ == "__main__":
    main()
