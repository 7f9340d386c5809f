"""``configure_cache``: switching the cache policy, the number of slots in use and the promoe mechanisms at run time,
between requests, inside the slots allocated at start.

The coordinator refuses the request (``busy``) while a generation runs or waits: a configuration never changes under
a request, and the operator decides when to retry. Once accepted it waits, at most ``CONFIGURE_TIMEOUT_S``, for the
cache to settle (speculative loads of the last request still in flight or being preempted), with the request queue
held; then the cache directory is emptied and reconfigured, the inference worker and the loader are told their part
(ordered before any later ``StartGeneration`` or ``LoadExpert`` on the same sockets), and the client gets
``cache_configured``. Nothing else is reset: totals, queue and workers carry on. A restarted worker is told the
settings in force again before it serves anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from coordinator.cache import CacheDirectory
from coordinator.host_compute import HOST_COMPUTE_MODES
from coordinator.policies import make_policy
from protocol.config import POLICIES, RuntimeConfig
from protocol.messages import (
    CacheConfigured,
    ConfigureCache,
    ConfigureInference,
    ConfigureLoader,
    ErrorReported,
    Message,
)
from workers.bootstrap import send

log = logging.getLogger(__name__)

CONFIGURE_TIMEOUT_S = 30.0
"""Longest a ``configure_cache`` waits for the loads of the last request to complete or be preempted."""


@dataclass(frozen=True)
class CacheSettings:
    """What ``configure_cache`` switches (the runtime starts with its flags' values)."""

    policy: str
    """ondemand | lru | lfu | promoe."""
    cache_experts: int
    """Slots in use, ``0 .. cache_experts-1`` of those allocated at start."""
    early_preemption: bool
    """promoe: preempt and reorder speculative loads when a gate reports."""
    reordered_inference: bool
    """The inference worker computes experts as they become ready."""
    chunked_loads: bool
    """The loader reads its inbox between chunks (False: between whole experts)."""
    prefetch: bool
    """The operator's choice for promoe: predictions drive speculative loads (in force only under promoe)."""
    host_compute: str = "never"
    """auto | never | always (``coordinator/host_dispatch.py``); other than never only if the runtime started with
    host compute on (its workers then share the inputs and compute)."""

    @classmethod
    def at_start(cls, cfg: RuntimeConfig) -> CacheSettings:
        return cls(policy=cfg.policy, cache_experts=cfg.layout.n_slots, early_preemption=cfg.early_preemption,
                   reordered_inference=cfg.reordered_inference, chunked_loads=True, prefetch=True,
                   host_compute=cfg.host_compute)

    @property
    def predicting(self) -> bool:
        """Whether predictions drive loads now (promoe with prefetch)."""
        return self.policy == "promoe" and self.prefetch

    def updated(self, msg: ConfigureCache, top_k: int, max_slots: int) -> CacheSettings:
        """These settings with the request's non-nil fields; ``ValueError`` says what is out of range."""
        if msg.policy is not None and msg.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {msg.policy!r}")
        if msg.cache_experts is not None and not top_k <= msg.cache_experts <= max_slots:
            raise ValueError(f"cache_experts must be in {top_k} (one layer's top-k) .. {max_slots} (the slots "
                             f"allocated at start), got {msg.cache_experts}")
        if msg.host_compute is not None and msg.host_compute not in HOST_COMPUTE_MODES:
            raise ValueError(f"host_compute must be one of {', '.join(HOST_COMPUTE_MODES)}, got {msg.host_compute!r}")
        changes = {f.name: getattr(msg, f.name) for f in dataclasses.fields(self) if getattr(msg, f.name) is not None}
        return dataclasses.replace(self, **changes)

    def reply(self, max_slots: int) -> CacheConfigured:
        return CacheConfigured(policy=self.policy, cache_experts=self.cache_experts, max_cache_experts=max_slots,
                               early_preemption=self.early_preemption, reordered_inference=self.reordered_inference,
                               chunked_loads=self.chunked_loads, prefetch=self.predicting,
                               host_compute=self.host_compute)

    def for_inference(self) -> ConfigureInference:
        return ConfigureInference(hidden_states=self.predicting, reordered_inference=self.reordered_inference,
                                  host_inputs=self.host_compute != "never")

    def for_loader(self) -> ConfigureLoader:
        return ConfigureLoader(chunked_loads=self.chunked_loads)


@dataclass
class PendingConfigure:
    envelope: list[bytes]
    settings: CacheSettings
    timer: asyncio.TimerHandle


class CacheConfigurator:
    """The settings in force and the one ``configure_cache`` waiting for the cache to settle, if any."""

    def __init__(self, cfg: RuntimeConfig, cache: CacheDirectory, send_to: dict[str, zmq.Socket],
                 reply: Callable[[list[bytes], Message], bool], on_applied: Callable[[], None],
                 on_host_compute: Callable[[str], None] | None = None) -> None:
        self.cache = cache
        self.host_available = cfg.host_compute != "never"
        """The workers share inputs and compute on the host (started with host compute on)."""
        self.on_host_compute = on_host_compute
        self.top_k = cfg.layout.top_k
        self.max_slots = cfg.layout.n_slots
        self.send_to = send_to
        self.reply = reply
        self.on_applied = on_applied
        self.settings = CacheSettings.at_start(cfg)
        self.pending: PendingConfigure | None = None

    def request(self, envelope: list[bytes], msg: ConfigureCache, busy: str | None) -> None:
        """Validate, then apply at once or as soon as the cache is idle; ``busy``: why it cannot be taken now."""
        try:
            settings = self.settings.updated(msg, self.top_k, self.max_slots)
            if settings.host_compute != "never" and not self.host_available:
                raise ValueError("host_compute needs a runtime started with --host-compute auto or always")
        except ValueError as exc:
            self.reply(envelope, ErrorReported(code="bad_request", message=str(exc)))
            return
        if busy is None and self.pending is not None:
            busy = "another configure_cache is being applied"
        if busy is not None:
            self.reply(envelope, ErrorReported(code="busy", message=f"configure_cache is applied only between "
                                                                    f"requests: {busy}; retry when idle"))
            return
        timer = asyncio.get_running_loop().call_later(CONFIGURE_TIMEOUT_S, self._expired)
        self.pending = PendingConfigure(envelope, settings, timer)
        self.try_apply()

    def try_apply(self) -> None:
        """Apply the pending configuration if the cache has settled (called after every cache event)."""
        pending = self.pending
        if pending is None or not self.cache.idle:
            return
        self.pending = None
        pending.timer.cancel()
        new = pending.settings
        self.cache.reconfigure(make_policy(new.policy, self.cache.layout), new.cache_experts, new.early_preemption)
        self.settings = new
        if self.on_host_compute is not None:
            self.on_host_compute(new.host_compute)
        self.tell("inference")
        self.tell("loader")
        log.info("cache configured: %s", new)
        self.reply(pending.envelope, new.reply(self.max_slots))
        self.on_applied()

    def tell(self, role: str) -> None:
        """Send ``role`` its part of the settings in force (after a configuration, or to a restarted worker)."""
        if role == "inference":
            send(self.send_to[role], self.settings.for_inference())
        elif role == "loader":
            send(self.send_to[role], self.settings.for_loader())

    def cancel(self, code: str, message: str) -> None:
        """Answer a pending configuration with an error (the runtime is stopping)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.timer.cancel()
            self.reply(pending.envelope, ErrorReported(code=code, message=message))

    def _expired(self) -> None:
        if self.pending is not None:
            self.cancel("busy", f"the cache did not settle within {CONFIGURE_TIMEOUT_S:.0f} s (loads still in "
                                "flight); nothing was changed")
            self.on_applied()
