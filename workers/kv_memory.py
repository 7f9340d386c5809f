"""How many requests the step loop may run at once: as many as their keys and values fit in memory (``--max-batch``
is the upper bound).

Each running request may grow to its prompt plus ``max_new_tokens`` tokens. The batched decode cache left-pads every
row to the longest, and a rebuild (a request joining or leaving) holds the rows cut out of the old cache beside the
new one, so a batch of ``n`` rows whose longest may reach ``t`` tokens is charged ``2 * n * t`` tokens' keys and
values. A request is admitted only if the batch with it stays within the budget: half the host memory available
when the worker starts on the CPU, 80% of the device memory free once the model and the cache slots are allocated
on CUDA. One request is always admitted (alone it needs what ``generate()`` would).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

HOST_FRACTION = 0.5
"""Share of the host memory available at start that keys and values may take (CPU path)."""
DEVICE_FRACTION = 0.8
"""Share of the device memory free after the model and the slots that keys and values may take (CUDA path)."""


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token adds to the cache, over every layer (``config``: the model's)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    key_dim = value_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if getattr(config, "qk_rope_head_dim", None) is not None:  # multi-head latent attention: full heads cached
        key_dim = int(config.qk_nope_head_dim) + int(config.qk_rope_head_dim)
        value_dim = int(config.v_head_dim)
    return int(config.num_hidden_layers) * kv_heads * (key_dim + value_dim) * dtype.itemsize


def memory_budget_bytes(device: torch.device) -> int:
    """What keys and values may take on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEVICE_FRACTION)
    import psutil

    return int(psutil.virtual_memory().available * HOST_FRACTION)


@dataclass(frozen=True)
class KvBudget:
    budget_bytes: int
    """Memory the batch's keys and values may take."""
    bytes_per_token: int
    """Keys and values of one token, every layer."""

    def admits(self, max_lengths: list[int]) -> bool:
        """Whether a batch whose rows may grow to ``max_lengths`` tokens fits (one row always does)."""
        if len(max_lengths) <= 1:
            return True
        return 2 * len(max_lengths) * max(max_lengths) * self.bytes_per_token <= self.budget_bytes

    def rows_of(self, max_length: int) -> int:
        """How many rows of ``max_length`` tokens fit (at least one)."""
        return max(1, self.budget_bytes // max(1, 2 * max_length * self.bytes_per_token))
