"""The loader process (``promoe::loader``): fills the host store from the checkpoint, then copies expert chunks into
cache slots in the order of its chunk queue, reading Load/Preempt/Reorder between chunks.

The copy itself is the engine's (``workers.copy_engine``): on the CPU path a memcpy between shared segments, paced
to ``link_gbps`` when given so that a PCIe link is emulated; on the CUDA path an asynchronous copy from the pinned
host store into the inference worker's GPU slots on the loader's own stream. Either way readiness is published in
the slot table only once a chunk's copy has completed, and only while the slot still belongs to that load.
"""

from __future__ import annotations

import logging
import sys
import time

import torch
import zmq

from models.checkpoint import open_checkpoint
from models.streaming import fill_store as stream_experts
from models.synthetic_experts import fill_store as fill_synthetic
from protocol.config import RuntimeConfig
from protocol.dispatch import Dispatcher
from protocol.messages import (
    ComputeExpert,
    ConfigureLoader,
    ExpertLoaded,
    LoadExpert,
    LoadsPreempted,
    Message,
    Ping,
    PingAnswered,
    Preempt,
    Reorder,
    SlotsExported,
)
from shm.cache_slots import CacheSlots
from shm.expert_store import HostExpertStore
from shm.host_exchange import HostExchange
from shm.segment import Segment
from shm.slot_table import SlotTable
from workers.bootstrap import IDLE_POLL_S, Inbox, WorkerSockets, push_socket, run_worker, send
from workers.chunk_queue import ChunkQueue, QueuedLoad
from workers.copy_engine import CopyEngine, CopyTicket, CpuCopyEngine
from workers.host_experts import HostExperts

__all__ = ["CpuCopyEngine", "Loader", "fill_store", "serve"]

HOST_SWITCH_INTERVAL_S = 0.0005
"""The loader's GIL switch interval with host compute on (Python's default is 5 ms): the emulated link's pacing
spins in Python between chunks, and the host-compute thread waits for the GIL between torch kernels."""
SLOTS_EXPORT_TIMEOUT_S = 300.0
"""CUDA path: how long the loader waits for the inference worker's ``SlotsExported`` after filling the store."""

log = logging.getLogger(__name__)


class Loader:
    def __init__(self, cfg: RuntimeConfig, table: SlotTable, engine: CopyEngine, inbox: Inbox,
                 send_to_coordinator: zmq.Socket) -> None:
        self.cfg = cfg
        self.table = table
        self.engine = engine
        self.inbox = inbox
        self.send_to_coordinator = send_to_coordinator
        self.queue = ChunkQueue()
        self.n_chunks = cfg.layout.n_chunks
        self._live_loads: set[int] = set()
        """Loads queued or being copied and not dropped since: only these report ``ExpertLoaded``."""
        self.chunked_loads = True
        """Read the inbox between chunks; False (``configure_cache``): only between whole experts, so that a load
        is preempted or overtaken at expert granularity, as with one chunk per expert."""
        self._partial: QueuedLoad | None = None
        self._copied: dict[int, tuple[int, int]] = {}
        """Per live load, (ns, bytes) its chunks took on the link so far (reported with ``ExpertLoaded``)."""
        self.host: HostExperts | None = None
        """``--host-compute``: computes experts on the host, on its own thread."""
        """The load whose chunks are being handed out, while some are left."""
        self.dispatch = Dispatcher("loader", {
            LoadExpert: self.on_load_expert,
            Preempt: self.on_preempt,
            Reorder: self.on_reorder,
            Ping: self.on_ping,
            ConfigureLoader: self.on_configure_loader,
            ComputeExpert: self.on_compute_expert,
        })

    def on_compute_expert(self, msg: ComputeExpert) -> None:
        if self.host is None:
            log.error("ComputeExpert for expert %d, but host compute is off", msg.expert)
            return
        self.host.submit(msg)

    def on_load_expert(self, msg: LoadExpert) -> None:
        if self.queue.holds(msg.load_id):
            log.debug("load %d is already queued (re-issued after a restart)", msg.load_id)
            return
        if msg.first_chunk == self.n_chunks:  # re-issued after a restart, every chunk had landed: only report it
            if self.table.slot_seq[msg.slot] == msg.seq and self.table.chunks_ready(msg.slot, msg.seq) >= self.n_chunks:
                send(self.send_to_coordinator, ExpertLoaded(load_id=msg.load_id, seq=msg.seq))
            return
        self.queue.push(QueuedLoad.from_message(msg, self.n_chunks))
        self._live_loads.add(msg.load_id)

    def on_preempt(self, msg: Preempt) -> None:
        dropped = self.queue.preempt(msg.load_ids)
        for load_id, _ in dropped:
            self._live_loads.discard(load_id)
            self._copied.pop(load_id, None)
        if dropped:
            send(self.send_to_coordinator, LoadsPreempted(
                load_ids=[d[0] for d in dropped], chunks_done=[d[1] for d in dropped]))

    def on_reorder(self, msg: Reorder) -> None:
        self.queue.reorder(msg.load_ids)

    def on_configure_loader(self, msg: ConfigureLoader) -> None:
        self.chunked_loads = msg.chunked_loads

    def on_ping(self, msg: Ping) -> None:
        send(self.send_to_coordinator, PingAnswered(role="loader", nonce=msg.nonce, sent_ns=msg.sent_ns))

    def drain_inbox(self, timeout_s: float) -> None:
        msg = self.inbox.poll(timeout_s)
        while msg is not None:
            try:
                self.dispatch(msg)
            except ValueError as exc:  # a command the chunk queue refuses
                log.error("rejected %s: %s", type(msg).__name__, exc)
            msg = self.inbox.poll(0)

    def step(self) -> bool:
        """Do one unit of work: publish completed chunks, and submit the next chunk if the engine has room or wait
        for the oldest copy in flight if it has not. Returns False when there is nothing queued and nothing in
        flight."""
        self.publish_completed(wait=False)
        if self.engine.in_flight() >= self.engine.max_in_flight:
            self.publish_completed(wait=True)
            return True
        item = self.queue.pop_chunk()
        if item is None:
            if self.engine.in_flight():
                self.publish_completed(wait=True)
                return True
            return False
        load, chunk = item
        self._partial = load if load.next_chunk < load.n_chunks else None
        if self.table.slot_seq[load.slot] != load.seq:  # checked before copying: never write a reassigned slot
            log.warning("slot %d was reassigned under load %d; dropping it", load.slot, load.load_id)
            self.queue.preempt([load.load_id])
            self._partial = None
            self._live_loads.discard(load.load_id)
            return True
        self.engine.submit(CopyTicket(load.expert, load.slot, chunk, token=load))
        self.publish_completed(wait=False)  # CPU: the copy is done already, so readiness goes out in this step
        return True

    def publish_completed(self, wait: bool) -> None:
        """Publish readiness of every chunk whose copy has completed (in order), and report finished loads."""
        for ticket in self.engine.completed(wait=wait):
            load = ticket.token
            assert isinstance(load, QueuedLoad)
            # False if the slot was reassigned while the copy was in flight: the new owner's readiness is not ours
            published = self.table.publish_ready(load.slot, load.seq, ticket.chunk + 1)
            copy_ns, nbytes = self._copied.pop(load.load_id, (0, 0))
            copy_ns, nbytes = copy_ns + ticket.copy_ns, nbytes + ticket.nbytes
            if ticket.chunk + 1 < load.n_chunks:
                if load.load_id in self._live_loads:
                    self._copied[load.load_id] = (copy_ns, nbytes)
                continue
            if load.load_id in self._live_loads:
                self._live_loads.discard(load.load_id)
                if published:
                    send(self.send_to_coordinator, ExpertLoaded(load_id=load.load_id, seq=load.seq, copy_ns=copy_ns,
                                                                copied_nbytes=nbytes))

    def between_loads(self) -> bool:
        """Whether the inbox may be read now: between two chunks, or (whole-expert loads) between two experts."""
        return self.chunked_loads or self._partial is None or not self.queue.holds(self._partial.load_id)

    def serve_step(self) -> bool:
        """One turn of ``serve``: read the inbox where allowed (new loads, preemptions, reorders), then one unit of
        work; False when there is nothing to do."""
        if self.between_loads():
            self.drain_inbox(0)
        return self.step()

    def serve(self) -> None:
        while True:
            if not self.serve_step():
                self.drain_inbox(IDLE_POLL_S)


def fill_store(cfg: RuntimeConfig, store: HostExpertStore) -> None:
    """Read every expert straight from the checkpoint's safetensors files into the host store (models.streaming),
    or generate them there for a checkpoint of synthetic experts (models.synthetic_experts)."""
    ckpt = open_checkpoint(cfg.checkpoint)
    if ckpt.synthetic is not None:
        fill_synthetic(ckpt.synthetic, cfg.layout, store)
        return
    report = stream_experts(ckpt, cfg.layout, store)
    log.info("host store filled: %d experts, %.1f MB in %.2f s (%.2f GB/s)", cfg.layout.n_experts,
             report.nbytes / 1e6, report.seconds, report.nbytes / 1e9 / max(report.seconds, 1e-9))


def serve(cfg: RuntimeConfig, sockets: WorkerSockets) -> None:
    torch.set_num_threads(1)
    lay = cfg.layout
    store = HostExpertStore(Segment.attach(cfg.segment("store")), lay)
    table = SlotTable(Segment.attach(cfg.segment("table")), lay.n_slots, lay.n_experts, lay.n_chunks, init=False)
    slots: CacheSlots | None = None
    engine: CopyEngine | None = None
    host: HostExperts | None = None
    report: zmq.Socket | None = None
    try:
        if table.store_filled:
            log.info("restarted: the host store is already filled")
        else:
            fill_store(cfg, store)
            table.store_filled = True
        early: list[Message] = []
        if cfg.device == "cuda":
            from workers.copy_engine import CudaCopyEngine
            from workers.gpu_slots import GpuSlots

            if cfg.link_gbps:
                log.warning("--link-gbps %.2f is ignored on the CUDA path: copies run at the link's own speed",
                            cfg.link_gbps)
            exported = wait_for_slots(sockets.inbox, SLOTS_EXPORT_TIMEOUT_S, early)
            engine = CudaCopyEngine(store, GpuSlots.attach(exported, lay))
        else:
            slots = CacheSlots(Segment.attach(cfg.segment("slots")), lay)
            engine = CpuCopyEngine(store, slots, cfg.link_gbps)
        loader = Loader(cfg, table, engine, sockets.inbox, sockets.send_to_coordinator)
        if cfg.host_compute != "never":
            report = push_socket(sockets.ctx, cfg.endpoint("coordinator"))  # used only by the host thread
            host = loader.host = start_host_experts(cfg, store, report)
        for msg in early:  # what arrived while waiting for the slots, in arrival order
            loader.dispatch(msg)
        sockets.announce_ready()
        loader.serve()
    finally:
        if host is not None:
            host.close()
            host.exchange.close()
        if report is not None:
            report.close(linger=0)
        if engine is not None:
            try:
                engine.close()
            except RuntimeError:  # e.g. a CUDA error after the inference worker died: still unmap the rest
                log.exception("closing the copy engine failed")
        store.close()
        if slots is not None:
            slots.close()
        table.close()


def start_host_experts(cfg: RuntimeConfig, store: HostExpertStore, report: zmq.Socket) -> HostExperts:
    """The host computations, reporting on their own socket to the coordinator (used only by their thread)."""
    from transformers.activations import ACT2FN

    lay = cfg.layout
    exchange = HostExchange(Segment.attach(cfg.segment("host")), len(lay.moe_layers), lay.experts_per_layer,
                            lay.top_k, lay.hidden_size, cfg.host_max_tokens)
    act_fn = ACT2FN[open_checkpoint(cfg.checkpoint).config.get("hidden_act", "silu")]
    sys.setswitchinterval(HOST_SWITCH_INTERVAL_S)  # the paced copy spins: let the host thread back in soon
    return HostExperts(lay, store, exchange, act_fn, lambda msg: send(report, msg))


def wait_for_slots(inbox: Inbox, timeout_s: float, early: list[Message]) -> SlotsExported:
    """CUDA path: the inference worker's ``SlotsExported``; other messages are kept in ``early`` for later."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no SlotsExported from the inference worker within {timeout_s:.0f} s")
        msg = inbox.poll(min(remaining, IDLE_POLL_S))
        if isinstance(msg, SlotsExported):
            return msg
        if msg is not None:
            early.append(msg)


def main(argv: list[str] | None = None) -> None:
    run_worker("loader", argv, serve)


if __name__ == "__main__":
    main()
