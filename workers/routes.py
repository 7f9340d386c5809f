"""Which of a gate's tokens each expert serves, worked out once per gate instead of once per expert.

transformers' eager experts loop builds a one-hot mask ``[E+1, k, T]`` and, for each expert ``e``, takes
``top_k_pos, token_idx = torch.where(mask[e])``: the (top-k position, token) pairs routed to ``e`` in ascending
(position, token) order. ``Routes`` gives the same pairs in the same order from one stable sort of the gate's
``top_k_index`` (flattened position-major, so a pair's flat index ``p * T + t`` orders as ``(p, t)`` does), so that
the rows an expert reads, and the products over them, are those of the eager loop bit for bit. Per expert only
views remain (``narrow``); the per-expert ``where``, the mask and the weights' gather (together about a fifth of a
batched decode step's time on the CPU) are gone.
"""

from __future__ import annotations

from itertools import accumulate

import torch


class Routes:
    def __init__(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, experts_per_layer: int) -> None:
        """``top_k_index [T, k]`` (index ``experts_per_layer``: routed to no expert), ``top_k_weights [T, k]``."""
        tokens = top_k_index.shape[0]
        flat = top_k_index.t().reshape(-1)  # [k*T] position-major, as each expert's [k, T] slice of the mask
        order = torch.argsort(flat, stable=True)  # [k*T] grouped by expert, (position, token) ascending in each
        counts = torch.bincount(flat, minlength=experts_per_layer + 1).tolist()  # the gate's one read of the device
        self._starts = [0, *accumulate(counts)]
        self.top_k_pos = order // max(tokens, 1)  # [k*T]
        self.token_idx = order % max(tokens, 1)  # [k*T]
        self.weights = top_k_weights[self.token_idx, self.top_k_pos, None]  # [k*T, 1] each pair's routing weight
        self.chosen = [e for e in range(experts_per_layer) if counts[e]]
        """Local ids of the experts the gate chose, ascending (the skipped index ``experts_per_layer`` left out)."""

    def rows(self, local: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(top_k_pos, token_idx)`` of the pairs routed to ``local``, as ``torch.where(mask[local])`` gives them."""
        lo, n = self._starts[local], self._starts[local + 1] - self._starts[local]
        return self.top_k_pos.narrow(0, lo, n), self.token_idx.narrow(0, lo, n)

    def weighted(self, local: int, rows: torch.Tensor) -> torch.Tensor:
        """``rows [n, H]`` of ``local`` times their routing weights (the eager loop's last product)."""
        lo, n = self._starts[local], self._starts[local + 1] - self._starts[local]
        return rows * self.weights.narrow(0, lo, n)
