"""How many requests the step loop may run at once: as many as their keys and values fit in memory (``--max-batch``
is the upper bound).

Each running request may grow to its prompt plus ``max_new_tokens`` tokens. The batched decode cache left-pads every
row to the longest, and a rebuild (a request joining or leaving) holds the rows cut out of the old cache beside the
new one, so a batch of ``n`` rows whose longest may reach ``t`` tokens is charged ``2 * n * t`` tokens' keys and
values. A request is admitted only if the batch with it stays within the budget, measured when the first batched
request arrives (every worker has started by then: the host store is filled, the loader's CUDA context made): half
the host memory available (and under the cgroup's limit) on the CPU, 80% of the device memory free on CUDA. One
request is always admitted (alone it needs what ``generate()`` would).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HOST_FRACTION = 0.5
"""Share of the host memory available at start that keys and values may take (CPU path)."""
DEVICE_FRACTION = 0.8
"""Share of the device memory free after the model and the slots that keys and values may take (CUDA path)."""


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token adds to transformers' cache, over every layer (``config``: the model's).
    Multi-head latent attention (``kv_lora_rank``) caches the compressed latent and the rotary key, one head wide;
    tests/test_batch.py checks both layouts against the cache transformers really fills."""
    layers = int(config.num_hidden_layers)
    if getattr(config, "kv_lora_rank", None) is not None:
        return layers * (int(config.kv_lora_rank) + int(config.qk_rope_head_dim)) * dtype.itemsize
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return layers * kv_heads * 2 * head_dim * dtype.itemsize


def memory_budget_bytes(device: torch.device) -> int:
    """What keys and values may take on ``device`` now (see the module docstring; the host's share is also bounded
    by the cgroup's memory limit, where there is one)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEVICE_FRACTION)
    import psutil

    available = psutil.virtual_memory().available
    try:  # cgroup v2: the container's limit, which psutil does not see
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return int(max(available, 0) * HOST_FRACTION)


@dataclass(frozen=True)
class KvBudget:
    """Whether a batch's keys and values fit (see the module docstring)."""

    budget_bytes: int
    """Memory the batch's keys and values may take."""
    bytes_per_token: int
    """Keys and values of one token, every layer."""

    def admits(self, max_tokens: list[int]) -> bool:
        """Whether a batch whose rows may grow to ``max_tokens`` tokens each fits (one row always does)."""
        if len(max_tokens) <= 1:
            return True
        return 2 * len(max_tokens) * max(max_tokens) * self.bytes_per_token <= self.budget_bytes

    def rows_of(self, max_tokens: int) -> int:
        """How many rows of ``max_tokens`` tokens fit (at least one)."""
        return max(1, self.budget_bytes // max(1, 2 * max_tokens * self.bytes_per_token))
