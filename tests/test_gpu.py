"""The CUDA path on a GPU (marked ``gpu``: skipped without CUDA).

- The oracle with ``--device cuda``: the whole runtime (GPU slots exported by CUDA IPC, the loader's stream, the
  pinned host store) produces exactly the greedy tokens of transformers on the same device and dtype (bf16).
- Poison: the slots start as NaN and every copy is held back on the loader's stream behind a long GPU sleep; the
  experts backend must compute only after the copy completed, so the result equals eager and holds no NaN.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from protocol.config import RuntimeConfig
from protocol.ids import ExpertId, LoadId, SlotId
from protocol.messages import LoadExpert
from shm.expert_store import HostExpertStore
from shm.layout import ExpertLayout
from shm.segment import Segment, segment_name
from shm.slot_table import SlotTable
from tests.conftest import NEW_TOKENS, PROMPT_IDS
from tests.test_offloaded_experts import HIDDEN, INTER, MOE_LAYERS, N_EXPERTS, TOP_K, experts_modules, routing

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_reference(checkpoint: Path) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, experts_implementation="eager")
    model.to("cuda")
    prompt = torch.tensor([PROMPT_IDS], device="cuda")
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False)
    tokens = out[0, len(PROMPT_IDS):].tolist()
    del model
    torch.cuda.empty_cache()
    assert len(set(tokens)) > 3
    return tokens


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("policy", "cache_experts"), [("lru", 4), ("lfu", 24), ("promoe", 24), ("promoe", 192),
                                                       ("ondemand", 8)])
def test_cuda_runtime_matches_transformers_on_the_same_device(runtime_factory, cuda_reference, policy: str,
                                                              cache_experts: int) -> None:
    rt = runtime_factory("--device", "cuda", "--policy", policy, "--cache-experts", str(cache_experts),
                         "--max-batch", "1")  # generate(), one request at a time: the step loop's test is below
    with rt.client() as client:
        done = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
    assert done.token_ids == cuda_reference
    assert done.metrics["experts_loaded"] > 0


BATCH_PROMPTS = [PROMPT_IDS, [7, 7, 7, 7, 7], list(range(100, 113))]


@pytest.mark.timeout(300)
def test_cuda_step_loop_gives_each_batched_request_its_tokens_alone(runtime_factory, checkpoint: Path) -> None:
    """Continuous batching on the GPU (the default ``--max-batch``): three requests of different lengths sent at
    once run together through the step loop, and each gets the greedy tokens transformers gives it alone on the same
    device and dtype (bf16). The batched passes pad and mask where ``generate()`` alone does not; if this fails while
    the test above passes, batched bf16 rounds differently from unbatched: compare the logits
    (``bench/batch_logits.py``) before suspecting the runtime."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, experts_implementation="eager")
    model.to("cuda")
    references = []
    for ids in BATCH_PROMPTS:
        prompt = torch.tensor([ids], device="cuda")
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                             do_sample=False)
        references.append(out[0, len(ids):].tolist())
        assert len(set(references[-1])) > 2, "a degenerate reference says nothing"
    del model
    torch.cuda.empty_cache()
    rt = runtime_factory("--device", "cuda", "--policy", "promoe", "--cache-experts", "24")
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    arrived: dict[int, list[float]] = {i: [] for i in range(len(BATCH_PROMPTS))}

    def ask(i: int) -> None:
        try:
            with rt.client() as client:
                results[i] = client.generate(prompt_ids=BATCH_PROMPTS[i], max_new_tokens=NEW_TOKENS,
                                             on_token=lambda token: arrived[i].append(time.monotonic())).token_ids
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(BATCH_PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert [results.get(i) for i in range(len(BATCH_PROMPTS))] == references
    last_start, first_end = max(times[0] for times in arrived.values()), min(times[-1] for times in arrived.values())
    assert last_start < first_end, "the three never ran together (one ended before another's first token)"


@pytest.mark.timeout(120)
def test_compute_never_reads_a_slot_whose_copy_is_in_flight(tmp_path: Path) -> None:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from workers.bootstrap import push_socket
    from workers.copy_engine import CudaCopyEngine
    from workers.gpu_slots import GpuSlots
    from workers.loader import Loader
    from workers.offloaded_experts import OffloadedExperts

    config = Qwen2MoeConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, moe_intermediate_size=INTER,
        shared_expert_intermediate_size=16, num_experts=N_EXPERTS, num_experts_per_tok=TOP_K, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, mlp_only_layers=[0])
    torch.manual_seed(99)
    model = Qwen2MoeForCausalLM(config).eval().requires_grad_(False).to("cuda")
    model.set_experts_implementation("eager")
    modules = experts_modules(model)
    layout = ExpertLayout(moe_layers=MOE_LAYERS, experts_per_layer=N_EXPERTS, top_k=TOP_K, hidden_size=HIDDEN,
                          intermediate_size=INTER, storage_dtype="float32", compute_dtype="float32", n_chunks=3,
                          n_slots=len(MOE_LAYERS) * N_EXPERTS)
    run_id = f"test_{uuid.uuid4().hex[:12]}"
    segments = [Segment.create(segment_name(run_id, "store"), HostExpertStore.nbytes_for(layout)),
                Segment.create(segment_name(run_id, "table"), SlotTable.nbytes_for(layout.n_slots, layout.n_experts))]
    store = HostExpertStore(segments[0], layout)
    table = SlotTable(segments[1], layout.n_slots, layout.n_experts, layout.n_chunks, init=True)
    ctx = zmq.Context()
    sink = push_socket(ctx, f"ipc://{tmp_path / 'nobody.sock'}")
    engine: Any = None
    try:
        for moe_layer, module in enumerate(modules):
            for e in range(N_EXPERTS):
                eid = layout.expert_id(moe_layer, e)
                store.write_matrix(eid, "gate", module.gate_up_proj[e, :INTER].cpu())
                store.write_matrix(eid, "up", module.gate_up_proj[e, INTER:].cpu())
                store.write_matrix(eid, "down", module.down_proj[e].cpu())
        slots = GpuSlots.allocate(layout, torch.device("cuda"))
        assert torch.isnan(slots.slots).all(), "slots start poisoned"
        engine = CudaCopyEngine(store, slots)
        cfg = RuntimeConfig(run_id=run_id, run_dir=str(tmp_path), checkpoint="", layout=layout, policy="lru",
                            device="cuda", bind="", link_gbps=None, lookahead=1, predictor_path=None,
                            load_timeout_s=30.0, supervisor_pid=os.getpid())
        loader = Loader(cfg, table, engine, inbox=None, send_to_coordinator=sink)  # type: ignore[arg-type]
        backend = OffloadedExperts(layout, table, slots, modules, on_gate=lambda *a: None,
                                   on_released=lambda e: None, load_timeout_s=30.0)
        hidden, index, weights = (t.cuda() for t in routing(9, seed=5))
        chosen = sorted(set(index.flatten().tolist()))
        with torch.cuda.stream(engine.stream):
            torch.cuda._sleep(200_000_000)  # hold every copy back on the loader's stream (~0.1 s)
        for load_id, local in enumerate(chosen):
            eid = layout.expert_id(0, local)
            seq = table.assign(SlotId(eid), ExpertId(eid))
            loader.on_load_expert(LoadExpert(load_id=LoadId(load_id), expert=ExpertId(eid), slot=SlotId(eid), seq=seq))

        def run_loader() -> None:
            while loader.step():
                pass

        thread = threading.Thread(target=run_loader, daemon=True)
        thread.start()
        with torch.no_grad():
            out = backend.forward(modules[0], hidden, index, weights)
            reference = modules[0](hidden, index, weights)
        thread.join(30)
        torch.cuda.synchronize()
        assert not torch.isnan(out).any(), "the backend read a slot before its copy completed"
        assert torch.equal(out, reference)
        assert backend.stats.stall_ns > 0, "the copies were held back: the backend must have waited"
    finally:
        if engine is not None:
            engine.close()
        sink.close(linger=0)
        ctx.term()
        store.close()
        table.close()
        for segment in segments:
            segment.unlink()
