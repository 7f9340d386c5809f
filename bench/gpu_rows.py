"""Measuring the rows of the GPU benchmark: the runtime (started once per routing source, reconfigured per row with
``configure_cache``), plain transformers on the same device, the host-to-device link, and the reference run that
gives the oracle tokens and the routing for the Belady floor.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.gpu_models import ModelSpec
from bench.gpu_workload import Request, Workload
from coordinator.runtime_process import RuntimeProcess

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 120.0
"""Longest one request may take before the benchmark gives up on the runtime."""


@dataclass(frozen=True)
class RowConfig:
    """One runtime row: what ``configure_cache`` is sent before its requests."""

    label: str
    """The row's name in the table (``promoe``, ``all_resident``, ``ablation: prefetch only``, ...)."""
    policy: str
    """Cache policy."""
    cache_fraction: float
    """Share of all experts the cache holds."""
    early_preemption: bool = True
    """promoe: early preemption."""
    reordered_inference: bool = True
    """Compute experts as they land."""
    chunked_loads: bool = True
    """Chunk-wise loads (False: an expert's chunks as one unit)."""
    prefetch: bool = True
    """promoe: predictions drive loads."""
    host_compute: str = "never"
    """auto | never | always: may misses be computed on the host (the runtime starts with it on; every row sets
    it)."""

    def cache_experts(self, spec: ModelSpec) -> int:
        return max(spec.top_k, round(spec.n_experts * self.cache_fraction))


def start_runtime(executor: ThreadPoolExecutor, root: Path, checkpoint: Path, flags: list[str],
                  ready_timeout_s: float) -> Future[RuntimeProcess]:
    """Start ``launch.py`` in the background (its start-up overlaps the reference run in this process)."""
    return executor.submit(RuntimeProcess, root, checkpoint, *flags, ready_timeout_s=ready_timeout_s)


def summarise(results: list[Any], wall_s: float) -> dict[str, Any]:
    """One row from the measured requests' ``GenerationDone`` replies."""
    n = len(results)
    metrics = [r.metrics for r in results]
    uses = sum(int(m["expert_uses"] or 0) for m in metrics)
    hits = sum((m["hit_rate"] or 0.0) * int(m["expert_uses"] or 0) for m in metrics)
    goodpred = [m["goodpred"] for m in metrics if m["goodpred"] is not None]
    return {
        "ttft_ms": sum(m["ttft_ms"] for m in metrics) / n,
        "tpot_ms": sum(m["tpot_ms"] for m in metrics) / n,
        "stall_ms": sum(m["stall_ms"] for m in metrics) / n,
        "hit_rate": hits / uses if uses else None,
        "goodpred": sum(goodpred) / len(goodpred) if goodpred else None,
        "prefetch_precision": _mean([m.get("prefetch_precision") for m in metrics]),
        "bytes_loaded": sum(int(m["bytes_loaded"] or 0) for m in metrics),
        "host_experts": sum(int(m.get("host_experts") or 0) for m in metrics),
        "host_ms": sum(float(m.get("host_ms") or 0.0) for m in metrics),
        "metrics_cache_experts": metrics[0].get("cache_experts"),
        "time_ms": sum(m["ttft_ms"] + m["tpot_ms"] * (len(r.token_ids) - 1) for m, r in zip(metrics, results,
                                                                                            strict=True)),
        "tokens": [r.token_ids for r in results],
        "wall_s": wall_s,
    }


def _mean(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def measure_runtime(rt: RuntimeProcess, spec: ModelSpec, workload: Workload, config: RowConfig) -> dict[str, Any]:
    """Configure, warm up, then run the measured requests."""
    started = time.perf_counter()
    fields = {k: v for k, v in asdict(config).items() if k not in ("label", "cache_fraction")}
    with rt.client(timeout_s=REQUEST_TIMEOUT_S) as client:
        reply = client.configure_cache(cache_experts=config.cache_experts(spec), **fields)
        warmup = workload.measured if config.label == "all_resident" else workload.warmup
        for request in warmup:
            client.generate(prompt_ids=list(request.prompt), max_new_tokens=request.new_tokens)
        done = [client.generate(prompt_ids=list(r.prompt), max_new_tokens=r.new_tokens) for r in workload.measured]
    row = summarise(done, time.perf_counter() - started)
    row["configured"] = {"policy": reply.policy, "cache_experts": reply.cache_experts, "prefetch": reply.prefetch,
                         "host_compute": reply.host_compute}
    return row


class TokenClock:
    """A transformers streamer that timestamps the first and the last generated token (as the runtime does)."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.first_s: float | None = None
        self.last_s: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        self.first_s = self.first_s or now
        self.last_s = now

    def end(self) -> None:
        pass


def generate(model: Any, request: Request, clock: TokenClock | None = None) -> list[int]:
    device = next(model.parameters()).device
    ids = torch.tensor([request.prompt], device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.new_tokens,
                             do_sample=False, streamer=clock)
    return out[0, len(request.prompt):].tolist()


def measure_transformers(model: Any, workload: Workload) -> dict[str, Any]:
    """Plain transformers, every expert resident: one warm-up, then the measured requests, timed like the runtime."""
    started = time.perf_counter()
    generate(model, (workload.warmup or workload.measured)[0])
    ttft, tpot, time_ms, tokens = [], [], 0.0, []
    for request in workload.measured:
        clock = TokenClock()
        begin = time.perf_counter()
        out = generate(model, request, clock)
        first, last = clock.first_s or begin, clock.last_s or begin
        ttft.append((first - begin) * 1e3)
        tpot.append((last - first) * 1e3 / max(len(out) - 1, 1))
        time_ms += ttft[-1] + tpot[-1] * (len(out) - 1)
        tokens.append(out)
    n = len(workload.measured)
    return {"ttft_ms": sum(ttft) / n, "tpot_ms": sum(tpot) / n, "stall_ms": None, "hit_rate": None,
            "goodpred": None, "bytes_loaded": 0, "time_ms": time_ms, "tokens": tokens,
            "wall_s": time.perf_counter() - started}


def reference_run(model: Any, spec: ModelSpec, workload: Workload) -> tuple[list[list[int]], list[set[int]]]:
    """Greedy tokens of every request (warm-up first) and the expert set (flat ids) each MoE layer used, in order."""
    accesses: list[set[int]] = []
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(module: torch.nn.Module, args: tuple, output: tuple, i: int = i) -> None:
            accesses.append({i * spec.experts + int(e) for e in output[2].flatten().tolist()})

        handles.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        tokens = [generate(model, request) for request in workload.requests]
    finally:
        for handle in handles:
            handle.remove()
    return tokens, accesses


def link_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Median of 5 pinned host-to-device copies of ``nbytes`` (after one warm-up), timed with CUDA events."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.random_(0, 255)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for rep in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        if rep:
            times.append(start.elapsed_time(end) / 1e3)
    if not torch.equal(dst[:4096].cpu(), src[:4096]):
        raise RuntimeError("the pinned copy did not arrive intact")
    del src, dst
    return nbytes / sorted(times)[len(times) // 2] / 1e9
