"""What the coordinator knows of each worker's health: ping answers and their round trips, deaths and restarts
reported by the supervisor, and which workers have gone silent (heartbeats).

Pure bookkeeping on the coordinator's event-loop clock; the coordinator decides what to send.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

WORKER_ROLES = ("inference", "predictor", "loader")
ANSWERING_WITHIN_S = 3.0
"""A worker that answered a ping this recently counts as answering in health reports."""


class WorkerWatch:
    def __init__(self, heartbeat_timeout_s: float) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.last_answer: dict[str, float] = {}
        self.round_trip_ns: dict[str, deque[int]] = {role: deque(maxlen=64) for role in WORKER_ROLES}
        self.down: set[str] = set()
        """Workers that died and have not reported ready again."""
        self.restarts: dict[str, int] = dict.fromkeys(WORKER_ROLES, 0)
        self._reported_silent: set[str] = set()
        """Workers reported to the supervisor as silent, until their death is reported back."""

    def answered(self, role: str, now_s: float, round_trip_ns: int) -> None:
        self.last_answer[role] = now_s
        if role in self.round_trip_ns:
            self.round_trip_ns[role].append(round_trip_ns)

    def died(self, role: str) -> None:
        self.down.add(role)
        self._reported_silent.discard(role)

    def restarted(self, role: str, now_s: float) -> None:
        self.down.discard(role)
        self.last_answer[role] = now_s
        self.restarts[role] = self.restarts.get(role, 0) + 1

    def newly_silent(self, now_s: float) -> list[tuple[str, float]]:
        """Workers silent past the heartbeat deadline, each reported once. Not judged: a worker still starting
        (never answered: the supervisor's start-up deadline covers it) or one being restarted."""
        silent = []
        for role in WORKER_ROLES:
            if role not in self.last_answer or role in self.down or role in self._reported_silent:
                continue
            silent_s = now_s - self.last_answer[role]
            if silent_s > self.heartbeat_timeout_s:
                self._reported_silent.add(role)
                silent.append((role, silent_s))
        return silent

    def answering(self, now_s: float) -> dict[str, bool]:
        return {role: now_s - self.last_answer.get(role, -math.inf) < ANSWERING_WITHIN_S for role in WORKER_ROLES}

    def round_trip_us(self) -> dict[str, float]:
        return {role: statistics.median(v) / 1e3 for role, v in self.round_trip_ns.items() if v}
