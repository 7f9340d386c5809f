"""The coordinator's side of host compute (``--host-compute``): the cost model (``coordinator/host_compute.py``),
fed with what the workers measure, and at every gate which of its missing experts the loader computes on the host.

Measurements:
- the link: each load's copy time and bytes, as the loader reports them in ``ExpertLoaded`` (the time its chunks
  spent on the link, not in its queue: timing ``LoadExpert`` to ``ExpertLoaded`` here would add the wait behind
  other loads, which ``decide`` already counts from ``link_queue``, twice);
- the host: each computation's token count and time (``ExpertComputed``, from reading its input to writing its
  output);
- the device: the inference worker's time per expert computed from a slot, carried by the next ``GateDecided``.

A gate's missing experts (chosen, not fully landed when it decided) are decided only when the worker published
the layer's input for the host (``GateDecided.host_input``: a small step, never prefill).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from coordinator.cache import CacheDirectory
from coordinator.host_compute import Choice, CostModelSettings, HostComputeModel, Miss, link_queue
from protocol.ids import ExpertId, RequestId
from protocol.messages import ComputeExpert, ExpertComputed, ExpertLoaded, GateDecided

log = logging.getLogger(__name__)


@dataclass
class HostCounters:
    """One request's host computations, as the coordinator saw them."""

    jobs: int = 0
    """``ComputeExpert`` commands sent."""
    host_ms: float = 0.0
    """Their reported time."""
    predicted_ms: float = 0.0
    """What the cost model predicted for the jobs it predicted (those decided with measurements)."""
    predicted_jobs: int = 0


class HostDispatch:
    def __init__(self, mode: str) -> None:
        self.model = HostComputeModel(CostModelSettings(mode=mode))
        self.request_id: RequestId | None = None
        self.request = HostCounters()
        self._unreported: list[ComputeExpert] = []
        """Jobs of the current request sent and not reported (the host's queue at the next gate; sent again to a
        restarted loader, whose predecessor may have taken them with it)."""

    def set_mode(self, mode: str) -> None:
        """Switch auto | never | always (``configure_cache``); what was measured is kept."""
        self.model.settings = dataclasses.replace(self.model.settings, mode=mode)

    @property
    def enabled(self) -> bool:
        """Whether the host may be asked at all (the mode is not ``never``)."""
        return self.model.settings.mode != "never"

    def begin_request(self, request_id: RequestId) -> None:
        self.request_id = request_id
        self.request = HostCounters()
        self._unreported = []

    def on_loaded(self, msg: ExpertLoaded) -> None:
        if msg.copy_ns > 0 and msg.copied_nbytes > 0:
            self.model.observe_link(msg.copied_nbytes, msg.copy_ns / 1e6)

    def on_computed(self, msg: ExpertComputed) -> None:
        self.model.observe_host(msg.n_tokens, msg.duration_ns / 1e6)
        if msg.request_id == self.request_id:
            done = next((i for i, job in enumerate(self._unreported) if job.expert == msg.expert), None)
            if done is not None:
                del self._unreported[done]
            self.request.host_ms += msg.duration_ns / 1e6

    def at_gate(self, cache: CacheDirectory, msg: GateDecided) -> list[ComputeExpert]:
        """The host jobs for this gate's missing experts (empty when the host is not asked)."""
        if msg.device_experts:
            self.model.observe_device(msg.device_ns / msg.device_experts / 1e6)
        if not self.enabled or not msg.host_input:
            return []
        ready = set(msg.ready_experts)
        missing = [e for e in msg.experts if e not in ready]
        if not missing:
            return []
        nbytes = cache.layout.expert_nbytes
        remaining, backlog_nbytes = link_queue(cache, set(missing), nbytes)
        host_each = self.model.host_ms(msg.n_tokens)
        decisions = self.model.decide(
            [Miss(e, nbytes, remaining.get(e)) for e in missing], tokens=msg.n_tokens,
            link_backlog_nbytes=backlog_nbytes, device_backlog_experts=len(msg.experts) - len(missing),
            host_backlog_ms=len(self._unreported) * (host_each or 0.0))
        jobs = []
        for decision in decisions:
            if decision.choice is not Choice.HOST:
                continue
            expert = ExpertId(decision.expert)
            jobs.append(ComputeExpert(request_id=msg.request_id, layer=msg.layer, step=msg.step, expert=expert,
                                      index=msg.experts.index(expert)))
            if decision.cost_ms is not None:
                self.request.predicted_ms += decision.cost_ms
                self.request.predicted_jobs += 1
        self._unreported.extend(jobs)
        self.request.jobs += len(jobs)
        return jobs

    def unreported(self) -> list[ComputeExpert]:
        """The current request's jobs not reported yet (a restarted loader gets them again: its predecessor may have
        died with them queued; one it had finished is computed again, the same output written again)."""
        return list(self._unreported)

    def metrics(self, host_experts_used: int) -> dict[str, float | int | None]:
        """The request's host-compute metrics (``host_experts``: uses the inference worker took from the host)."""
        r = self.request
        return {
            "host_experts": host_experts_used,
            "host_jobs": r.jobs,
            "host_ms": r.host_ms,
            "host_predicted_ms": r.predicted_ms if r.predicted_jobs else None,
            "host_predicted_jobs": r.predicted_jobs,
        }
