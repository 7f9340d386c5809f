"""One request of the step loop's batch (``workers/step_loop.py``): its prompt, its tokens so far, its sampling, set
up as ``generate()`` sets it up for that request alone."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from protocol.ids import RequestId
from workers.batch_cache import KV

if TYPE_CHECKING:
    from workers.inference import TokenStreamer

log = logging.getLogger(__name__)


DEFAULT_TOP_K = 50
"""The top-k ``generate()`` samples with when the checkpoint's generation config leaves it unset (transformers'
default generation parameters)."""


def logits_processors(generation_config: GenerationConfig, temperature: float, top_p: float) -> LogitsProcessorList:
    """The processors ``generate()`` applies for these settings and the checkpoint's generation config, in its order
    (repetition penalty; then, when sampling, temperature, top-k, top-p, min-p)."""
    cfg = generation_config
    top_k = DEFAULT_TOP_K if cfg.top_k is None else cfg.top_k
    processors = LogitsProcessorList()
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if temperature > 0:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=top_p))
        if cfg.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=cfg.min_p))
    return processors


@dataclass(eq=False)
class Sequence:
    """One request in the step loop's batch (compared by identity)."""

    request_id: RequestId
    prompt_ids: list[int]
    max_new_tokens: int
    stop_ids: set[int]
    processors: LogitsProcessorList
    generator: torch.Generator | None
    """Sampling: the request's own generator, seeded with its seed; None: greedy."""
    streamer: TokenStreamer
    received_ns: int
    """When the worker received it (``time.perf_counter_ns``): its TTFT counts from here."""
    generated: list[int] = field(default_factory=list)
    kv: KV | None = None
    """Its keys and values while it is not in the batched decode cache: between the chunks of its prefill, after
    its prefill, or cut out at a rebuild (None: nothing prefilled yet, or in the batched cache)."""
    length: int = 0
    """Tokens in its cache."""
    cancelled: bool = False
    uses: float = 0.0
    """Its share of the expert uses of the forward passes it was in (each pass's count over its rows)."""
    hits: float = 0.0
    """Its share of those uses' hits."""
    host_experts: float = 0.0
    """Its share of the experts those passes took from the host (``--host-compute``)."""
    stall_ns: int = 0
    """The time it waited for experts, in all (each pass's whole wait)."""

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits ``[V]``, as ``generate()`` picks it."""
        scores = logits.to(dtype=torch.float32).unsqueeze(0)  # [1, V]
        if self.processors:
            ids = torch.tensor([self.prompt_ids + self.generated], dtype=torch.long, device=logits.device)
            scores = self.processors(ids, scores)  # type: ignore[arg-type]  # a LongTensor by dtype
        if self.generator is None:
            return int(torch.argmax(scores, dim=-1)[0])
        probs = F.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator)[0, 0])

    @property
    def finish_reason(self) -> str | None:
        if self.cancelled:
            return "cancelled"
        if self.generated and self.generated[-1] in self.stop_ids:
            return "stop"
        if len(self.generated) >= self.max_new_tokens:
            return "length"
        return None
