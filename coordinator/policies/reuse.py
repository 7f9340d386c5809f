"""How likely an expert is to be chosen again, learned online from the gates the coordinator sees.

Real routing is bursty: an expert chosen by the last tokens is likely to be chosen again, one not chosen for long is
not, and how likely depends on both how long ago and how often (on the DeepSeek-V2-Lite trace of
``../shared/traces``, a use one token after the last one has probability 0.19 for an expert used once in the last
16 tokens and 0.37 for one used six times; 64 tokens after, 0.03). The model is a table of
``P(chosen at the next gate of its layer | tokens since its last use, its uses in the last WINDOW_TOKENS tokens)``,
counted over every expert of every gate, starting from the uniform rate ``top_k / E``. No training file: every
runtime learns its own model's routing as it serves.
"""

from __future__ import annotations

from collections import deque

import numpy as np

AGE_EDGES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128])
"""Bucket edges of the tokens since an expert's last use (never used: the last bucket)."""
COUNT_EDGES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64])
"""Bucket edges of an expert's uses in the last ``WINDOW_TOKENS`` tokens."""
WINDOW_TOKENS = 64
PRIOR_WEIGHT = 20.0
"""The uniform prior counts as this many observations in every cell."""
NEVER = 1 << 40
_AGE_BUCKET = np.searchsorted(AGE_EDGES, np.arange(AGE_EDGES[-1] + 1), side="right") - 1
"""Bucket of each age up to the last edge (older ones: the last bucket)."""
_COUNT_BUCKET = np.searchsorted(COUNT_EDGES, np.arange(WINDOW_TOKENS + 1), side="right") - 1


class ReuseModel:
    def __init__(self, n_experts: int, experts_per_layer: int, top_k: int) -> None:
        self.experts_per_layer = experts_per_layer
        self.token = 0
        """Tokens seen (a global clock over requests)."""
        self.last_token = np.full(n_experts, -NEVER, dtype=np.int64)  # [n_experts] token of the last use
        self.recent = np.zeros(n_experts, dtype=np.int64)  # [n_experts] uses in the last WINDOW_TOKENS tokens
        self._window: deque[list[int]] = deque()
        self._this_token: list[int] = []
        self.changed_recent = np.empty(0, dtype=np.int64)
        base = top_k / experts_per_layer
        shape = (len(AGE_EDGES), len(COUNT_EDGES))
        self._chosen = np.full(shape, PRIOR_WEIGHT * base)
        self._seen = np.full(shape, PRIOR_WEIGHT)
        self.table = self._chosen / self._seen
        """``P(chosen at the next gate of its layer)`` per (age bucket, count bucket)."""

    def next_token(self) -> None:
        """A new token starts: what the last one chose enters the window, what left the window leaves it."""
        self._window.append(self._this_token)
        np.add.at(self.recent, self._this_token, 1)
        left: list[int] = []
        if len(self._window) > WINDOW_TOKENS:
            left = self._window.popleft()
            np.subtract.at(self.recent, left, 1)
        self.changed_recent = np.unique(np.array(self._this_token + left, dtype=np.int64))
        """Experts whose count in the window changed at this token boundary."""
        self._this_token = []
        self.token += 1

    def observe(self, layer: int, chosen: list[int]) -> None:
        """The gate of ``layer`` chose ``chosen`` (global ids) for the current token: count every expert of the layer
        in its cell, then record the uses."""
        first = layer * self.experts_per_layer
        ids = slice(first, first + self.experts_per_layer)
        cells = self._cells(self.token - self.last_token[ids], self.recent[ids])
        np.add.at(self._seen, cells, 1.0)
        local = [e - first for e in chosen]
        np.add.at(self._chosen, (cells[0][local], cells[1][local]), 1.0)
        self.table = self._chosen / self._seen
        self.last_token[chosen] = self.token
        self._this_token.extend(chosen)

    def probability(self, experts: np.ndarray, at_token: np.ndarray) -> np.ndarray:
        """``P(chosen)`` of each of ``experts`` at a gate of its layer during token ``at_token``."""
        return self.table[self._cells(at_token - self.last_token[experts], self.recent[experts])]

    @staticmethod
    def _cells(age: np.ndarray, recent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _AGE_BUCKET[np.minimum(age, AGE_EDGES[-1])], _COUNT_BUCKET[recent]
