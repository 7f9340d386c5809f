"""Computing a missed expert on the host, where its weights already are, when that is faster than copying it.

At a gate, every chosen expert that is not resident can be served three ways:

- ``WAIT``: a load of it is already in flight (a prefetch the gate confirmed): wait for its remaining chunks;
- ``LOAD``: load it now, behind what the link already has to copy, then compute it on the device;
- ``HOST``: compute it on the host CPU from the host store (its own threads: in parallel with the link and the
  device); its output is added in the same ascending expert order as every other expert's, so the choice moves
  time, never the numbers.

``HostComputeModel`` chooses by when each expert's output would be ready, from what the runtime measures as it runs:
the link's bandwidth (every copy's bytes and time), the host's time per expert as a function of the token count
(an exponentially weighted least-squares line through every host computation's time), and the device's time per
expert. Nothing is a configured constant: before the first measurement of the host (or of the link) the first miss
without a load in flight goes to the host (or to the link) so that it gets measured. The misses of one gate are
assigned greedily, one at a time, to the resource that finishes it first (in-flight loads first, as the loader
serves them first), so the host takes a share of a gate's misses when the link has a queue and none when the link
would be faster.

What is not modelled here: whether a host-computed expert should also become resident is the cache policy's
business (the replay and the cache directory count a host computation as a use and do not load it for that gate;
a later prediction or miss may still load it).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coordinator.cache import CacheDirectory

log = logging.getLogger(__name__)

HOST_COMPUTE_MODES = ("auto", "never", "always")


class Choice(enum.Enum):
    WAIT = "wait"
    """Its load is in flight: wait for it."""
    LOAD = "load"
    """Load it now (a precise load), then compute it on the device."""
    HOST = "host"
    """Compute it on the host."""


@dataclass(frozen=True)
class Miss:
    """A chosen expert that was not resident when its gate decided."""

    expert: int
    """Global expert id."""
    nbytes: int
    """Bytes of the expert (as copied over the link, and as read by the host)."""
    in_flight_nbytes: int | None = None
    """Bytes its load in flight still has to copy; None if no load of it is in flight."""


@dataclass(frozen=True)
class Decision:
    """How one miss is served, and what the model expected of it."""

    expert: int
    """Global expert id."""
    choice: Choice
    """Wait for its load, load it, or compute it on the host."""
    cost_ms: float | None
    """Predicted time of the chosen work itself (the host computation, or the copy, or its remaining part); None
    before anything was measured."""
    ready_in_ms: float | None
    """Predicted time from the gate until its output is ready (queues ahead included); None before measurements."""


@dataclass(frozen=True)
class CostModelSettings:
    """How the estimates are formed (not what they are: those are measured)."""

    mode: str = "auto"
    """``auto`` (the cost model decides), ``never`` (always the link) or ``always`` (every miss on the host)."""
    smoothing: float = 0.1
    """Weight of the newest measurement in every exponential average (0 < smoothing <= 1)."""
    min_token_spread: float = 0.5
    """Below this standard deviation of recent host token counts the host's per-token slope is not fitted (every
    call had about the same token count) and ``prior_ms_per_token`` is used."""
    prior_ms_per_token: float = 0.0
    """Host ms per extra token until the token counts measured vary enough to fit it."""

    def __post_init__(self) -> None:
        if self.mode not in HOST_COMPUTE_MODES:
            raise ValueError(f"host compute mode {self.mode!r} not one of {', '.join(HOST_COMPUTE_MODES)}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing {self.smoothing} outside (0, 1]")


class _Average:
    """Exponentially weighted averages of several quantities, bias-corrected (the first sample is the average)."""

    def __init__(self, smoothing: float, n: int) -> None:
        self.smoothing = smoothing
        self.weight = 0.0
        self._sums = [0.0] * n

    def add(self, *values: float) -> None:
        keep = 1 - self.smoothing
        self.weight = keep * self.weight + self.smoothing
        self._sums = [keep * s + self.smoothing * v for s, v in zip(self._sums, values, strict=True)]

    def mean(self, i: int = 0) -> float | None:
        return self._sums[i] / self.weight if self.weight else None


class HostComputeModel:
    """Estimates fed by measurements (``observe_*``), and the choice for a gate's misses (``decide``)."""

    def __init__(self, settings: CostModelSettings | None = None) -> None:
        self.settings = settings or CostModelSettings()
        s = self.settings.smoothing
        self._link = _Average(s, 2)  # bytes, ms of each copy
        self._host = _Average(s, 4)  # tokens, ms, tokens^2, tokens*ms of each host computation
        self._device = _Average(s, 1)  # ms of each expert computed on the device

    # ------------------------------------------------------------ measurements
    def observe_link(self, nbytes: int, duration_ms: float) -> None:
        """A copy of ``nbytes`` over the link took ``duration_ms``."""
        self._link.add(float(nbytes), duration_ms)

    def observe_host(self, tokens: int, duration_ms: float) -> None:
        """One expert computed on the host for ``tokens`` tokens took ``duration_ms`` (from the request to the output
        written)."""
        self._host.add(float(tokens), duration_ms, float(tokens * tokens), tokens * duration_ms)

    def observe_device(self, duration_ms: float) -> None:
        """One expert computed on the device took ``duration_ms``."""
        self._device.add(duration_ms)

    # ------------------------------------------------------------ estimates
    @property
    def link_gbps(self) -> float | None:
        """Estimated link bandwidth, GB/s (None before any copy was measured)."""
        nbytes, ms = self._link.mean(0), self._link.mean(1)
        return None if nbytes is None or not ms else nbytes / ms / 1e6

    def link_ms(self, nbytes: float) -> float | None:
        """Estimated time to copy ``nbytes``."""
        gbps = self.link_gbps
        return None if gbps is None else nbytes / (gbps * 1e6)

    def host_ms(self, tokens: int) -> float | None:
        """Estimated time to compute one expert on the host for ``tokens`` tokens: ``a + b * tokens`` fitted to the
        recent measurements (``b`` the prior while their token counts hardly vary)."""
        mean_tokens = self._host.mean(0)
        if mean_tokens is None:
            return None
        mean_ms, mean_sq, mean_cross = (self._host.mean(i) or 0.0 for i in (1, 2, 3))
        variance = mean_sq - mean_tokens * mean_tokens
        if variance > self.settings.min_token_spread ** 2:
            slope = (mean_cross - mean_tokens * mean_ms) / variance
        else:
            slope = self.settings.prior_ms_per_token
        return max(0.0, mean_ms + slope * (tokens - mean_tokens))

    @property
    def device_ms_per_expert(self) -> float | None:
        """Estimated device time of one expert (None before any was measured)."""
        return self._device.mean()

    # ------------------------------------------------------------ the decision
    def decide(self, misses: Sequence[Miss], *, tokens: int = 1, link_backlog_nbytes: int = 0,
               device_backlog_experts: int = 0, host_backlog_ms: float = 0.0) -> list[Decision]:
        """How to serve each of a gate's ``misses`` (in the order given; the result follows it).

        ``tokens``: tokens each expert computes for (1 in a decode step); ``link_backlog_nbytes``: bytes the link
        copies before a new precise load starts, other than the misses' own loads in flight (which go first, fewest
        bytes left first); ``device_backlog_experts``: resident experts the device computes at this gate;
        ``host_backlog_ms``: host work already queued.
        """
        mode = self.settings.mode
        if mode != "auto":
            host = mode == "always"
            return [Decision(m.expert, Choice.HOST if host else Choice.WAIT if m.in_flight_nbytes is not None
                             else Choice.LOAD, None, None) for m in misses]
        bytes_per_ms = self._link.mean(0), self._link.mean(1)
        host_each = self.host_ms(tokens)
        device_each = self.device_ms_per_expert or 0.0
        link_known = bytes_per_ms[0] is not None and bool(bytes_per_ms[1])

        def copy_ms(nbytes: float) -> float:
            return nbytes * (bytes_per_ms[1] or 0.0) / (bytes_per_ms[0] or 1.0)

        decided: dict[int, Decision] = {}
        host_free = host_backlog_ms
        device_free = device_backlog_experts * device_each
        link_at = 0.0
        in_flight = sorted((m for m in misses if m.in_flight_nbytes is not None), key=lambda m: m.in_flight_nbytes or 0)
        new = [m for m in misses if m.in_flight_nbytes is None]
        for miss in [*in_flight, *new]:
            waits = miss.in_flight_nbytes is not None
            link_choice = Choice.WAIT if waits else Choice.LOAD
            if host_each is None and not waits:  # nothing measured on the host yet: measure it on this one
                decided[miss.expert] = Decision(miss.expert, Choice.HOST, None, None)
                host_each = float("inf")  # one exploration per gate; the rest go to the link
                continue
            if host_each is None or not link_known:  # nothing copied yet: copy this one to measure the link
                decided[miss.expert] = Decision(miss.expert, link_choice, None, None)
                continue
            nbytes = miss.in_flight_nbytes if waits else miss.nbytes
            cost = copy_ms(nbytes or 0)
            landed = link_at + cost if waits else link_at + copy_ms(link_backlog_nbytes) + cost
            by_device = max(landed, device_free) + device_each
            by_host = host_free + host_each
            if by_host < by_device:
                host_free = by_host
                decided[miss.expert] = Decision(miss.expert, Choice.HOST, host_each, by_host)
                if waits:
                    link_at += cost  # its load goes on (the loader serves it first anyway)
            else:
                device_free = by_device
                link_at += cost
                decided[miss.expert] = Decision(miss.expert, link_choice, cost, by_device)
        return [decided[m.expert] for m in misses]


def link_queue(cache: CacheDirectory, missing: Collection[int], expert_nbytes: int) -> tuple[dict[int, int], int]:
    """What the coordinator knows of the link's queue at a gate, from its loads in flight and the chunks the slot
    table shows landed: per expert of ``missing`` with a load in flight, the bytes it still has to copy; and the
    bytes of the other precise loads in flight (served before a new precise load; speculative ones come after)."""
    n_chunks = cache.layout.n_chunks
    chunk_nbytes = expert_nbytes // n_chunks
    remaining: dict[int, int] = {}
    backlog_nbytes = 0
    for load in cache.loads_in_flight():
        left_nbytes = (n_chunks - cache.table.chunks_ready(load.slot)) * chunk_nbytes
        if load.expert in missing:
            remaining[load.expert] = left_nbytes
        elif load.target is None:
            backlog_nbytes += left_nbytes
    return remaining, backlog_nbytes
