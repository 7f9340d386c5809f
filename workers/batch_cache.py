"""The step loop's batched caches (``workers/step_loop.py``): each sequence's keys and values are kept unpadded
while it is not in a batched cache, and a forward pass over several sequences gets a ``DynamicCache`` of them
left-padded to the longest, with a mask that hides the padding.

Batched prefill (``prefill_inputs``): the rows' past (what earlier chunks prefilled) is left-padded to the longest
past, and each row's chunk follows it right-padded to the longest chunk, so that every row's chunk starts in the same
column. A padding query then always sees its own row's chunk (its real tokens come before it), so no query of the
pass sees nothing at all; the padding's keys and values are masked for every real query and cut away after the pass
(``cut``). Positions are each row's own (its past length onwards).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from transformers import DynamicCache

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per decoder layer: keys and values ``[1, heads, length, head_dim]`` of one sequence, unpadded."""


def assemble(kvs: Sequence[KV | None], lengths: Sequence[int], config: Any,
             device: torch.device) -> tuple[DynamicCache, torch.Tensor]:
    """A ``DynamicCache`` of the rows (``kvs[i]`` holds ``lengths[i]`` positions; None: nothing yet), each
    left-padded with zeros to the longest, and its mask ``[rows, longest]`` (0 on each row's padding)."""
    longest = max(lengths)
    mask = torch.zeros((len(kvs), longest), dtype=torch.long, device=device)
    for row, length in enumerate(lengths):
        mask[row, longest - length:] = 1
    known = [kv for kv in kvs if kv]
    if longest == 0 or not known:
        return DynamicCache(config=config), mask
    data = []
    for layer, (k0, v0) in enumerate(known[0]):
        keys, values = [], []
        for kv, length in zip(kvs, lengths, strict=True):
            if kv is None:
                keys.append(k0.new_zeros((1, k0.shape[1], longest, k0.shape[3])))
                values.append(v0.new_zeros((1, v0.shape[1], longest, v0.shape[3])))
            else:
                k, v = kv[layer]
                keys.append(F.pad(k, (0, 0, longest - length, 0)))
                values.append(F.pad(v, (0, 0, longest - length, 0)))
        data.append((torch.cat(keys), torch.cat(values)))
    return DynamicCache(data, config=config), mask


def cut(cache: DynamicCache, row: int, start: int, stop: int) -> KV:
    """Row ``row``'s keys and values at cache columns ``start:stop`` (its unpadded part)."""
    return [(k[row:row + 1, :, start:stop], v[row:row + 1, :, start:stop]) for k, v, *_ in cache]


@dataclass
class PrefillInputs:
    """The inputs of one batched prefill pass (``prefill_inputs``)."""

    cache: DynamicCache
    """The rows' past, left-padded to ``past_width``."""
    past_width: int
    """Columns of the past in the cache (the longest past)."""
    input_ids: torch.Tensor
    """``[rows, longest chunk]``: each row's chunk, right-padded (with its last token)."""
    attention_mask: torch.Tensor
    """``[rows, past_width + longest chunk]``: 1 on each row's past and chunk, 0 on its padding."""
    position_ids: torch.Tensor
    """``[rows, longest chunk]``: each row's own positions, from its past length on (padding repeats the last)."""
    real_tokens: torch.Tensor
    """``[rows * longest chunk]`` bool: the chunk's real tokens, row by row (the experts backend routes no other)."""
    last_positions: torch.Tensor
    """``[rows, 1]``: each row's last real column of the chunk (the logits kept)."""


def prefill_inputs(kvs: Sequence[KV | None], lengths: Sequence[int], chunks: Sequence[list[int]], config: Any,
                   device: torch.device) -> PrefillInputs:
    """Inputs of a forward pass that prefills ``chunks[i]`` after the ``lengths[i]`` positions of ``kvs[i]``."""
    cache, past_mask = assemble(kvs, lengths, config, device)
    width = max(len(chunk) for chunk in chunks)
    input_ids = torch.tensor([chunk + [chunk[-1]] * (width - len(chunk)) for chunk in chunks], dtype=torch.long)
    chunk_mask = torch.tensor([[1] * len(chunk) + [0] * (width - len(chunk)) for chunk in chunks], dtype=torch.long)
    position_ids = torch.stack([torch.arange(length, length + width).clamp(max=length + len(chunk) - 1)
                                for chunk, length in zip(chunks, lengths, strict=True)])
    last = torch.tensor([[len(chunk) - 1] for chunk in chunks], dtype=torch.long)
    chunk_mask = chunk_mask.to(device)
    return PrefillInputs(cache, past_mask.shape[1], input_ids.to(device), torch.cat([past_mask, chunk_mask], dim=1),
                         position_ids.to(device), chunk_mask.reshape(-1).bool(), last.to(device))
