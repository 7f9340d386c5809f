"""Synthetic experts (generated into the host store, identical in the benchmark's reference model) and the
routing-replay model of the GPU benchmark (its routers choose exactly what the DeepSeek trace recorded)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from bench.gpu_models import DEEPSEEK_TINY, QWEN_TINY, build_model, make_replay, set_synthetic_routers, write_checkpoint
from bench.gpu_workload import RequestSizes, default_trace, expected_accesses, trace_workload
from models.checkpoint import open_checkpoint
from models.skeleton import build_skeleton, experts_modules
from models.synthetic_experts import SyntheticExperts, fill_store
from protocol.config import RuntimeConfig
from shm.expert_store import HostExpertStore
from shm.segment import Segment, segment_name
from workers.loader import fill_store as loader_fill_store

TRACE = default_trace()
SIZES = RequestSizes(prompt_tokens=5, new_tokens=4, measured=2, warmup_prompt_tokens=3, warmup_new_tokens=2)


def test_the_store_holds_exactly_the_reference_experts_none_of_them_zero() -> None:
    spec = QWEN_TINY
    synthetic = SyntheticExperts(seed=7, std=0.02, dtype="bfloat16", zero_down_rows=(60, 64))
    layout = spec.layout(n_slots=spec.n_experts, compute_dtype="float32")
    segment = Segment.create(segment_name(f"test_{uuid.uuid4().hex[:10]}", "store"),
                             HostExpertStore.nbytes_for(layout))
    store = HostExpertStore(segment, layout)
    try:
        fill_store(synthetic, layout, store)
        pool = synthetic.pool(layout.expert_numel)
        for e in range(layout.n_experts):
            assert torch.equal(store.experts[e], synthetic.expert(pool, layout, e)), e
            assert store.experts[e].count_nonzero() > 0.9 * (layout.expert_numel - 4 * layout.intermediate_size)
            down = store.experts[e][2 * layout.intermediate_size * layout.hidden_size:].view(64, 32)
            assert not down[60:].any() and down[:60].count_nonzero() > 0
        assert not torch.equal(store.experts[0], store.experts[1]), "experts are distinct windows"
        again = SyntheticExperts(seed=7, std=0.02, dtype="bfloat16").pool(layout.expert_numel)
        assert torch.equal(pool, again), "the pool is deterministic"
    finally:
        store.close()
        segment.unlink()


def test_a_synthetic_checkpoint_opens_validates_and_fills_through_the_loader(tmp_path: Path) -> None:
    spec = QWEN_TINY
    model = build_model(spec, torch.device("cpu"))
    set_synthetic_routers(model, spec)
    ckpt = open_checkpoint(write_checkpoint(model, spec, tmp_path / "ckpt"))
    assert ckpt.synthetic == spec.synthetic_experts() and ckpt.storage_dtype() == "bfloat16"
    layout = ckpt.layout(n_slots=8, n_chunks=3, compute_dtype="float32")
    ckpt.validate(layout)  # no expert tensor on disk, and that is fine
    assert not any(".mlp.experts." in key for key in ckpt.tensors)
    run_id = f"test_{uuid.uuid4().hex[:10]}"
    segment = Segment.create(segment_name(run_id, "store"), HostExpertStore.nbytes_for(layout))
    store = HostExpertStore(segment, layout)
    try:
        cfg = RuntimeConfig(run_id=run_id, run_dir=str(tmp_path), checkpoint=str(ckpt.path), layout=layout,
                            policy="lru", device="cpu", bind="", link_gbps=None, lookahead=2, predictor_path=None,
                            load_timeout_s=1.0, supervisor_pid=os.getpid())
        loader_fill_store(cfg, store)
        experts = model.model.layers[1].mlp.experts
        e = layout.expert_id(1, 3)
        gate_up = 2 * spec.inter * spec.hidden
        assert torch.equal(store.experts[e][:gate_up].view(2 * spec.inter, spec.hidden), experts.gate_up_proj[3])
        assert torch.equal(store.experts[e][gate_up:].view(spec.hidden, spec.inter), experts.down_proj[3])
    finally:
        store.close()
        segment.unlink()


def replay_model(tmp_path: Path) -> tuple[object, object]:
    workload = trace_workload(DEEPSEEK_TINY, SIZES, TRACE)
    model = build_model(DEEPSEEK_TINY, torch.device("cpu"))
    assert workload.replayed is not None
    make_replay(model, DEEPSEEK_TINY, workload.replayed)
    return model, workload


def routing_of(model: object, workload) -> tuple[list[list[int]], list[set[int]]]:
    from bench.gpu_rows import reference_run

    return reference_run(model, DEEPSEEK_TINY, workload)


@pytest.mark.skipif(not TRACE.is_file(), reason="the routing trace is not beside the checkout")
def test_the_runtime_model_of_the_replay_routes_exactly_as_the_trace_and_walks_it(tmp_path: Path) -> None:
    """The runtime's own model (the skeleton loaded from the checkpoint, experts from the synthetic generator as the
    loader fills them) chooses the trace's experts at every layer of every token, and generates the next position."""
    spec = DEEPSEEK_TINY
    model, workload = replay_model(tmp_path)
    ckpt = open_checkpoint(write_checkpoint(model, spec, tmp_path / "replay"))
    layout = ckpt.layout(n_slots=spec.n_experts, n_chunks=3, compute_dtype="float32")
    skeleton = build_skeleton(ckpt, torch.float32, layout.moe_layers)
    synthetic, gate_up = spec.synthetic_experts(), 2 * spec.inter * spec.hidden
    pool = synthetic.pool(layout.expert_numel)
    for moe_layer, module in enumerate(experts_modules(skeleton, layout.moe_layers)):
        flats = torch.stack([synthetic.expert(pool, layout, int(layout.expert_id(moe_layer, e)))
                             for e in range(spec.experts)]).float()  # [E, 3*I*H]
        module.gate_up_proj = torch.nn.Parameter(flats[:, :gate_up].reshape(spec.experts, 2 * spec.inter, spec.hidden),
                                                 requires_grad=False)
        module.down_proj = torch.nn.Parameter(flats[:, gate_up:].reshape(spec.experts, spec.hidden, spec.inter),
                                              requires_grad=False)
    skeleton.set_experts_implementation("eager")
    tokens, accesses = routing_of(skeleton, workload)
    assert accesses == expected_accesses(workload, spec.experts)
    for request, out in zip(workload.requests, tokens, strict=True):
        last = request.prompt[-1]
        assert out == list(range(last + 1, last + 1 + request.new_tokens)), "greedy generation walks the trace"


@pytest.mark.skipif(not TRACE.is_file(), reason="the routing trace is not beside the checkout")
def test_the_replay_check_fails_when_attention_writes_into_the_code(tmp_path: Path) -> None:
    model, workload = replay_model(tmp_path)
    reserved = DEEPSEEK_TINY.hidden - DEEPSEEK_TINY.replay_positions
    with torch.no_grad():
        for layer in model.model.layers:  # type: ignore[attr-defined]
            layer.self_attn.o_proj.weight[reserved:].normal_(0.0, 0.5)
    _, accesses = routing_of(model, workload)
    assert accesses != expected_accesses(workload, DEEPSEEK_TINY.experts)
