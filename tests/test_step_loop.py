# ruff: noqa: F811  (``model`` and ``references`` are tests/test_batch.py's fixtures, imported by name for pytest)
"""The step loop in-process (``workers/step_loop.py``, ``workers/kv_memory.py``): failures, each row's share of a
pass's counters, batched prefill and admission by memory, on plain transformers with fakes for the rest of the
worker. The runtime's batching tests are tests/test_batch.py's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.test_batch import MAX_BATCH, REQUESTS, WAIT_S, model, references  # noqa: F401


def test_a_failed_decode_fails_every_row_and_leaves_no_batch():
    """A forward pass that fails (here a load timeout) fails each request in it once, and the loop starts afresh."""
    import zmq
    from transformers import LogitsProcessorList

    from protocol.codec import decode
    from protocol.ids import RequestId
    from protocol.messages import GenerationFailed
    from workers.offloaded_experts import LoadTimedOut
    from workers.step_loop import Sequence, StepLoop

    ctx = zmq.Context()
    results, sender = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        results.bind("inproc://results")
        sender.connect("inproc://results")
        pins_cleared: list[bool] = []
        table = SimpleNamespace(clear_pins=lambda: pins_cleared.append(True))
        worker = SimpleNamespace(backend=SimpleNamespace(table=table), send_to_coordinator=sender, recorder=None,
                                 feed=None, sockets=SimpleNamespace(answer_ping=lambda msg: None))
        loop = StepLoop(worker, 4, 8, on_configure=lambda msg: None)  # type: ignore[arg-type]
        rows = [Sequence(RequestId(i), [1, 2], 4, set(), LogitsProcessorList(), None, None, 0)  # type: ignore[arg-type]
                for i in range(3)]
        loop.running, loop.cache_rows, loop.cache = list(rows), [s.request_id for s in rows], object()  # type: ignore[assignment]
        loop.fail(loop.running, LoadTimedOut("experts not ready"))
        assert results.poll(int(WAIT_S * 1000))
        failed = [decode(results.recv()) for _ in range(3)]
        assert all(isinstance(f, GenerationFailed) and f.code == "load_timeout" for f in failed)
        assert sorted(f.request_id for f in failed) == [0, 1, 2]
        assert loop.running == [] and loop.cache is None and pins_cleared
        assert not results.poll(0), "a request failed twice"
    finally:
        results.close(linger=0)
        sender.close(linger=0)
        ctx.term()


def test_each_row_is_charged_its_share_of_a_passs_uses_hits_and_host_experts():
    """A pass's expert uses, hits and experts taken from the host are shared out over its rows, and each request's
    result carries its share."""
    from transformers import LogitsProcessorList

    from protocol.ids import RequestId
    from workers.offloaded_experts import LayerStats
    from workers.step_loop import Sequence, StepLoop

    backend = SimpleNamespace(request_ids=[], real_tokens=None, stats=LayerStats())

    def model(**inputs):  # the experts backend counts while the pass runs
        backend.stats.uses, backend.stats.hits, backend.stats.host_experts = 12, 6, 4
        return SimpleNamespace(logits=torch.zeros(2, 1, 8))

    ended: list[tuple] = []
    worker = SimpleNamespace(backend=backend, model=model, recorder=None, feed=None,
                             sockets=SimpleNamespace(answer_ping=lambda msg: None),
                             finished=lambda *args: ended.append(args))
    loop = StepLoop(worker, 4, 8, on_configure=lambda msg: None)  # type: ignore[arg-type]
    rows = [Sequence(RequestId(i), [1, 2], 4, set(), LogitsProcessorList(), None, None, 0)  # type: ignore[arg-type]
            for i in range(2)]
    assert loop.forward(rows, None, [[2], [2]]) is not None
    assert [(seq.uses, seq.hits, seq.host_experts) for seq in rows] == [(6.0, 3.0, 2.0)] * 2
    loop.finished(rows[0], "length")
    assert ended[0][-3:] == (6, 3, 2)  # uses, hits, host experts of GenerationFinished


def cached_bytes_per_token(model: torch.nn.Module, tokens: int = 3) -> int:
    """Bytes the model's own cache holds per token after a forward pass of ``tokens`` tokens."""
    with torch.inference_mode():
        cache = model(torch.tensor([list(range(1, tokens + 1))]), use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return held // tokens


def test_keys_and_values_per_token_and_what_fits():
    """A token's keys and values over every layer, checked against the cache transformers really fills (grouped
    heads; multi-head latent attention's compressed latent), and a batch fits while 2 x rows x its longest
    reservation stays within the budget (one row always fits)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    from workers.kv_memory import KvBudget, kv_bytes_per_token

    qwen = Qwen2MoeConfig(vocab_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_experts=4,
                          num_experts_per_tok=2, shared_expert_intermediate_size=16)
    mla = DeepseekV2Config(vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                           q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                           n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)
    for config, model_class in ((qwen, Qwen2MoeForCausalLM), (mla, DeepseekV2ForCausalLM)):
        model = model_class(config).eval()
        assert kv_bytes_per_token(config, torch.float32) == cached_bytes_per_token(model), config.model_type
    kv = KvBudget(budget_bytes=1000, bytes_per_token=5)
    assert kv.admits([500]) and kv.admits([50, 50]) and not kv.admits([50, 51]) and not kv.admits([40, 40, 40])
    assert kv.rows_of(50) == 2 and kv.rows_of(10_000) == 1


KV_TOKENS = 100
"""A memory budget of 100 tokens' keys and values: 2 x rows x longest reservation <= 100 (the first two requests,
24 and 9 tokens at most, fit together; a third of 25 does not)."""


@pytest.mark.parametrize(("budget", "kv_tokens"), [(5, None), (32, None), (32, KV_TOKENS)])
def test_requests_admitted_together_are_prefilled_in_one_pass(model, references, budget, kv_tokens):
    """The step loop in-process on plain transformers (eager experts): requests that arrive together are admitted in
    one iteration and their prompts (3 to 13 tokens) prefilled together, at most ``--prefill-chunk`` (``budget``)
    real tokens a pass for all rows together (5: prompts split over passes, rows with different pasts in one pass;
    32: the four admitted prompts in a single pass); every request gets the greedy tokens of transformers alone.
    With a memory budget (``kv_tokens``) a request waits until the batch's keys and values fit with it: no pass
    holds more than fits, and every request is still served, in order of arrival."""
    import zmq

    from protocol.codec import decode
    from protocol.ids import RequestId
    from protocol.messages import CancelGeneration, GenerationFinished, StartGeneration
    from protocol.schema import SamplingParams
    from workers.inference import InferenceWorker
    from workers.kv_memory import KvBudget
    from workers.offloaded_experts import LayerStats
    from workers.step_loop import StepLoop

    ctx = zmq.Context()
    results, sender = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    passes: list[tuple[list[int], int | None]] = []
    """Per forward pass: its requests, and its real (unpadded) tokens when it is a prefill."""
    backend = SimpleNamespace(request_ids=[], real_tokens=None, stats=LayerStats(), begin_request=lambda r: None,
                              table=SimpleNamespace(clear_pins=lambda: None))
    hook = model.register_forward_pre_hook(lambda module, args: passes.append(
        (list(backend.request_ids), None if backend.real_tokens is None else int(backend.real_tokens.sum()))))
    try:
        results.bind("inproc://prefill-results")
        sender.connect("inproc://prefill-results")
        sockets = SimpleNamespace(send_to_coordinator=sender, answer_ping=lambda msg: None)
        worker = InferenceWorker(model, None, backend, sockets)  # type: ignore[arg-type]
        kv = None if kv_tokens is None else KvBudget(budget_bytes=kv_tokens, bytes_per_token=1)
        loop = StepLoop(worker, MAX_BATCH, budget, on_configure=lambda msg: None,
                        kv_budget=None if kv is None else lambda: kv)
        for i, (ids, n) in enumerate(REQUESTS):
            loop.on_start_generation(StartGeneration(request_id=RequestId(i), prompt_ids=ids,
                                                     params=SamplingParams(max_new_tokens=n)))
        loop.run_step()
        admitted = 2 if kv_tokens else MAX_BATCH
        assert len(loop.waiting) + (loop.next_up is not None) == len(REQUESTS) - admitted, "admitted wrongly"
        held = None
        if kv_tokens:  # the request held back for memory is cancelled while it waits
            assert loop.next_up is not None
            held = loop.next_up.request_id
            loop.on_cancel_generation(CancelGeneration(request_id=held))
        while loop.waiting or loop.next_up or loop.prefilling or loop.running:
            loop.run_step()
        finished = {}
        while results.poll(0):
            msg = decode(results.recv())
            if isinstance(msg, GenerationFinished):
                finished[msg.request_id] = msg
    finally:
        hook.remove()
        results.close(linger=0)
        sender.close(linger=0)
        ctx.term()
    assert sorted(finished) == list(range(len(REQUESTS)))
    for i, msg in finished.items():
        if i == held:
            assert msg.finish_reason == "cancelled" and msg.token_ids == []
            continue
        assert msg.token_ids == references[i], f"request {i} (prefill budget {budget})"
    prefills = [(ids, real) for ids, real in passes if real is not None]
    assert all(real <= budget for _, real in prefills), prefills
    if kv_tokens is not None:
        longest = [len(ids) + n for ids, n in REQUESTS]
        assert all(2 * len(ids) * max(longest[i] for i in ids) <= kv_tokens or len(ids) == 1 for ids, _ in passes)
        assert max(len(ids) for ids, _ in passes) == 2
    served = [i for i in range(len(REQUESTS)) if i != held]
    prompt_tokens = sum(len(REQUESTS[i][0]) for i in served)
    assert sum(real for _, real in prefills) == prompt_tokens, "a prompt token twice or never"
    shared = max(len(ids) for ids, _ in prefills)
    assert shared == (2 if budget == 5 or kv_tokens else MAX_BATCH), f"prefill passes {prefills}"
    first_pass = [next(n for n, (ids, _) in enumerate(passes) if i in ids) for i in served]
    assert first_pass == sorted(first_pass), "a request was admitted before one that arrived earlier"
