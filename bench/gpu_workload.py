"""The requests of the GPU benchmark: what every configuration is measured on, for each routing source.

Every configuration of one routing source runs the same requests: ``warmup`` first (to fill the cache the way a
server that has been running would, and to warm kernels), then ``measured``. ``all_resident`` uses the measured
requests themselves as its warm-up, so that every expert they use is in the cache before they are measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.gpu_models import ModelSpec
from training.routing_stats import consecutive_overlap, top_quarter_share

TRACE_NAME = "deepseek-v2-lite-routing.npz"
TRACE_PLACES = (Path(__file__).resolve().parents[1] / ".whl" / "data" / TRACE_NAME,
                Path(__file__).resolve().parents[2] / "shared" / "traces" / TRACE_NAME)
"""Where the routing trace is looked for: brought along to the GPU machine by ``bench/gpu_wheels.sh``, else
``../shared/traces`` beside the checkout (``--trace`` overrides both)."""


def default_trace() -> Path:
    return next((p for p in TRACE_PLACES if p.is_file()), TRACE_PLACES[-1])


@dataclass(frozen=True)
class Request:
    """One greedy generation."""

    prompt: tuple[int, ...]
    """Prompt token ids."""
    new_tokens: int
    """Tokens to generate."""


@dataclass(frozen=True)
class RequestSizes:
    """How long the requests are."""

    prompt_tokens: int
    """Prompt of each measured request."""
    new_tokens: int
    """Generated tokens of each measured request."""
    measured: int
    """Measured requests per configuration."""
    warmup_prompt_tokens: int
    """Prompt of the warm-up request."""
    warmup_new_tokens: int
    """Generated tokens of the warm-up request (0: no warm-up request)."""


@dataclass(frozen=True)
class Workload:
    warmup: tuple[Request, ...]
    measured: tuple[Request, ...]
    replayed: np.ndarray | None = None
    """Trace routing: ``[T, L, k]`` experts of token id ``t`` (the replayed trace positions, in order)."""
    trace_rows: tuple[int, ...] = ()
    """Trace routing: the trace row of each token id."""

    @property
    def requests(self) -> tuple[Request, ...]:
        return self.warmup + self.measured


def synthetic_workload(spec: ModelSpec, sizes: RequestSizes) -> Workload:
    """Seeded random prompts."""
    gen = torch.Generator().manual_seed(spec.seed + 2)

    def prompt(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(0, spec.vocab, (n,), generator=gen).tolist())

    warmup = Request(prompt(sizes.warmup_prompt_tokens), sizes.warmup_new_tokens)
    measured = tuple(Request(prompt(sizes.prompt_tokens), sizes.new_tokens) for _ in range(sizes.measured))
    return Workload((warmup,) if sizes.warmup_new_tokens else (), measured)


def trace_workload(spec: ModelSpec, sizes: RequestSizes, trace: Path) -> Workload:
    """One stretch of a real prompt per request, from its first token: the first trace prompts long enough."""
    data = np.load(trace)
    experts, offsets = data["experts"], data["prompt_offsets"]  # [N, 26, 6], [P+1]
    if experts.shape[2] != spec.top_k or experts.shape[1] < spec.layers or int(experts.max()) >= spec.experts:
        raise ValueError(f"{trace}: routing {experts.shape} does not fit {spec.name}")
    n_warmup = 1 if sizes.warmup_new_tokens else 0
    lengths = [(sizes.warmup_prompt_tokens, sizes.warmup_new_tokens)] * n_warmup
    lengths += [(sizes.prompt_tokens, sizes.new_tokens)] * sizes.measured
    rows: list[int] = []
    requests: list[Request] = []
    prompt_no = 0
    for prompt_tokens, new_tokens in lengths:
        span = prompt_tokens + new_tokens
        while prompt_no + 1 < len(offsets) and offsets[prompt_no + 1] - offsets[prompt_no] < span:
            prompt_no += 1
        if prompt_no + 1 >= len(offsets):
            raise ValueError(f"{trace}: not enough prompts of {span} tokens")
        first_id = len(rows)
        rows.extend(range(int(offsets[prompt_no]), int(offsets[prompt_no]) + span))
        requests.append(Request(tuple(range(first_id, first_id + prompt_tokens)), new_tokens))
        prompt_no += 1
    if len(rows) > spec.replay_positions or len(rows) + 1 > spec.vocab:
        raise ValueError(f"{len(rows)} replayed positions exceed {spec.name}'s {spec.replay_positions}")
    replayed = experts[rows][:, : spec.layers]  # [T, L, k]
    return Workload(tuple(requests[:n_warmup]), tuple(requests[n_warmup:]), replayed, tuple(rows))


def trace_routing_stats(workload: Workload, experts_per_layer: int) -> dict[str, float]:
    """Routing figures of the replayed positions of the measured requests (as the synthetic source reports)."""
    assert workload.replayed is not None
    spans, first = [], sum(len(r.prompt) + r.new_tokens for r in workload.warmup)
    for request in workload.measured:
        span = len(request.prompt) + request.new_tokens
        spans.append(workload.replayed[first : first + span])
        first += span
    chosen = torch.from_numpy(np.stack(spans).astype(np.int64)).permute(2, 0, 1, 3)  # [L, W, S, k]
    return {"topk_overlap_consecutive": consecutive_overlap(chosen),
            "top_quarter_share": top_quarter_share(chosen, experts_per_layer)}


def expected_accesses(workload: Workload, experts_per_layer: int) -> list[set[int]]:
    """Trace routing: the expert sets (flat ids) each MoE layer must use, in execution order, for every request
    (prefill: the union over the prompt; then one step per generated token but the last)."""
    assert workload.replayed is not None
    out: list[set[int]] = []
    next_id = 0
    for request in workload.requests:
        prompt = workload.replayed[next_id : next_id + len(request.prompt)]  # [P, L, k]
        layers = prompt.shape[1]
        out += [{layer * experts_per_layer + int(e) for e in prompt[:, layer].flatten()} for layer in range(layers)]
        for step in range(request.new_tokens - 1):
            row = workload.replayed[next_id + len(request.prompt) + step]  # [L, k]
            out += [{layer * experts_per_layer + int(e) for e in row[layer]} for layer in range(layers)]
        next_id += len(request.prompt) + request.new_tokens
    return out
