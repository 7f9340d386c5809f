"""Continuous batching (``--max-batch``): every request of a batch gets the tokens plain transformers gives it alone.

Requests arrive at different times (each is sent once the one before it streamed its second token, so it joins a
running batch), with different prompt lengths and lengths of output, so that the batch grows, shrinks and is
rebuilt while it runs. That they really ran together is checked from the token streams: a later request's first
token comes before an earlier one's last.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from coordinator.client import RequestFailed
from coordinator.runtime_process import RuntimeProcess
from protocol.messages import GenerationDone, TokenStreamed

MAX_BATCH = 4
FLAGS = ("--policy", "lru", "--cache-experts", "192", "--lookahead", "2", "--link-gbps", "20",
         "--max-batch", str(MAX_BATCH), "--prefill-chunk", "5")
"""Prompts of 8 and 13 tokens are prefilled in 2 and 3 chunks, between the batch's decode steps."""
# (prompt ids, new tokens): different prompt lengths, different lengths of output
REQUESTS = [
    ([35, 80, 111, 109, 111, 69, 32, 40], 16),
    ([1, 2, 3], 6),
    (list(range(100, 113)), 12),
    ([7, 7, 7, 7, 7], 9),
    ([200, 13, 54, 90, 18, 33], 7),
]
SAMPLED = {"temperature": 0.8, "top_p": 0.9}
WAIT_S = 60.0
"""Deadline of every wait in this module."""


@pytest.fixture(scope="module")
def model(checkpoint: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, experts_implementation="eager")


def plain(model, ids: list[int], new_tokens: int, seed: int | None = None) -> list[int]:
    """Plain transformers, the request alone: greedy, or sampled with ``SAMPLED`` as the worker seeds it."""
    prompt = torch.tensor([ids])
    kwargs: dict = {"do_sample": False}
    if seed is not None:
        torch.manual_seed(seed)
        kwargs = {"do_sample": True, **SAMPLED}
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, **kwargs)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def references(model) -> list[list[int]]:
    return [plain(model, ids, n) for ids, n in REQUESTS]


class Staggered:
    """Runs requests on their own connections, each sent once the one before it streamed ``after_tokens`` tokens;
    records when each token arrived."""

    def __init__(self, rt: RuntimeProcess, n: int, after_tokens: int = 2) -> None:
        self.rt = rt
        self.after_tokens = after_tokens
        self.streamed = [threading.Event() for _ in range(n)]
        self.token_s: list[list[float]] = [[] for _ in range(n)]
        self.results: list[GenerationDone | BaseException | None] = [None] * n

    def run(self, requests: list[Callable]) -> list[GenerationDone | BaseException | None]:
        threads = [threading.Thread(target=self._one, args=(i, send)) for i, send in enumerate(requests)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
            assert not thread.is_alive(), "a request did not finish in time"
        return self.results

    def _one(self, i: int, send: Callable) -> None:
        try:
            if i > 0:
                assert self.streamed[i - 1].wait(WAIT_S), f"request {i - 1} streamed no tokens"
            with self.rt.client(timeout_s=WAIT_S) as client:
                self.results[i] = send(client, lambda t: self._token(i, t))
        except BaseException as exc:  # the main thread asserts on it
            self.results[i] = exc
        finally:
            self.streamed[i].set()  # never leave the next one waiting on a failure

    def _token(self, i: int, token: TokenStreamed) -> None:
        self.token_s[i].append(time.monotonic())
        if len(self.token_s[i]) == self.after_tokens:
            self.streamed[i].set()

    def overlapped(self, earlier: int, later: int) -> bool:
        """The later request's first token came before the earlier one's last: they ran together."""
        return self.token_s[later][0] < self.token_s[earlier][-1]


class Together:
    """Sends requests all at once, each on its own connection (released together by a barrier)."""

    def __init__(self, rt: RuntimeProcess) -> None:
        self.rt = rt

    def run(self, requests: list[tuple[list[int], int]]) -> list[GenerationDone | BaseException | None]:
        results: list[GenerationDone | BaseException | None] = [None] * len(requests)
        barrier = threading.Barrier(len(requests))

        def one(i: int, ids: list[int], n: int) -> None:
            try:
                with self.rt.client(timeout_s=WAIT_S) as client:
                    barrier.wait(WAIT_S)
                    results[i] = client.generate(prompt_ids=ids, max_new_tokens=n)
            except BaseException as exc:  # the main thread asserts on it
                results[i] = exc

        threads = [threading.Thread(target=one, args=(i, ids, n)) for i, (ids, n) in enumerate(requests)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
            assert not thread.is_alive(), "a request did not finish in time"
        return results


@pytest.mark.parametrize("policy", ["lru", "promoe", "ondemand", "lfu"])
def test_batched_greedy_tokens_match_transformers_alone(runtime_keeper, checkpoint, references, policy):
    rt = runtime_keeper.serving(checkpoint, FLAGS, policy, 24)
    run = Staggered(rt, len(REQUESTS))
    results = run.run([lambda client, on_token, ids=ids, n=n: client.generate(prompt_ids=ids, max_new_tokens=n,
                                                                              on_token=on_token)
                       for ids, n in REQUESTS])
    for i, result in enumerate(results):
        assert isinstance(result, GenerationDone), f"request {i}: {result!r}"
        assert result.token_ids == references[i], f"request {i} under {policy}"
        assert result.finish_reason == "length"
    assert run.overlapped(0, 1) and run.overlapped(0, 2), "the requests did not run in one batch"
    # loads are charged to the requests their steps served, shared: the shares add up to what was loaded
    loaded = sum(r.metrics["experts_loaded"] for r in results if isinstance(r, GenerationDone))
    assert loaded > 0
    # all at once: requests admitted in the same iteration are prefilled together (batched prefill; that one pass
    # serves several requests is checked in-process below), their padding routed to no expert
    together = Together(rt).run(REQUESTS[:MAX_BATCH])
    for i, result in enumerate(together):
        assert isinstance(result, GenerationDone), f"request {i} sent together: {result!r}"
        assert result.token_ids == references[i], f"request {i} sent together under {policy}"
    if policy == "promoe":
        assert results[0].metrics["prefetch_precision"] is not None, "the predictor predicted nothing for the batch"
    with rt.client() as client:
        health = client.health()
    assert health.running is None and health.queued == 0


def test_a_request_cancelled_mid_batch_leaves_and_the_others_go_on(runtime_keeper, checkpoint, references):
    rt = runtime_keeper.serving(checkpoint, FLAGS, "lru", 24)
    ids, n = REQUESTS[0]
    cancelled_at: list[int] = []

    def long_one(client, on_token):
        def cancel_after_three(token: TokenStreamed) -> None:
            on_token(token)
            if token.index == 3:
                client.send_cancel(token.request_id)
                cancelled_at.append(token.index)
        return client.generate(prompt_ids=[5, 6, 7, 8], max_new_tokens=400, on_token=cancel_after_three)

    def second(client, on_token):
        return client.generate(prompt_ids=ids, max_new_tokens=n, on_token=on_token)

    run = Staggered(rt, 2, after_tokens=1)
    long_result, second_result = run.run([long_one, second])
    assert isinstance(long_result, RequestFailed) and long_result.code == "cancelled", long_result
    assert len(run.token_s[0]) < 400 and cancelled_at == [3]
    assert isinstance(second_result, GenerationDone) and second_result.token_ids == references[0]
    assert run.overlapped(0, 1)
    with rt.client() as client:
        assert client.stats()["requests_cancelled"] >= 1


def test_sampled_requests_give_their_seeds_tokens_batched_and_alone(runtime_keeper, checkpoint, model):
    """Each request samples with its own generator: batched with others, its seed gives the tokens plain transformers
    gives it alone with that seed (``generate()`` after ``torch.manual_seed``, as at ``--max-batch 1``)."""
    rt = runtime_keeper.serving(checkpoint, FLAGS, "promoe", 24)
    seeds = [11, 12, 13]
    wanted = [plain(model, ids, n, seed) for (ids, n), seed in zip(REQUESTS, seeds, strict=False)]
    assert wanted[0] != plain(model, REQUESTS[0][0], REQUESTS[0][1], seed=99), "the seed must matter"
    run = Staggered(rt, len(seeds))
    results = run.run([lambda client, on_token, ids=ids, n=n, seed=seed: client.generate(
        prompt_ids=ids, max_new_tokens=n, seed=seed, on_token=on_token, **SAMPLED)
        for (ids, n), seed in zip(REQUESTS, seeds, strict=False)])
    for i, result in enumerate(results):
        assert isinstance(result, GenerationDone), f"request {i}: {result!r}"
        assert result.token_ids == wanted[i], f"request {i}"
    assert run.overlapped(0, 1)


def test_stop_ids_and_a_vanished_client_leave_the_batch(runtime_keeper, checkpoint, references):
    """A stop id ends its request at once (the others go on); a client that closes its connection mid-stream
    leaves at the next step."""
    rt = runtime_keeper.serving(checkpoint, FLAGS, "lru", 24)
    ids, n = REQUESTS[0]
    stop = references[0][4]
    gone = threading.Event()
    with rt.client() as client:
        before = client.stats()["requests_peer_gone"] or 0

    def vanishing(client, on_token):
        def leave_after_two(token: TokenStreamed) -> None:
            on_token(token)
            if token.index == 1:
                gone.set()
                raise ConnectionAbortedError("the client went away")
        return client.generate(prompt_ids=[9, 8, 7], max_new_tokens=400, on_token=leave_after_two)

    def stopping(client, on_token):
        return client.generate(prompt_ids=ids, max_new_tokens=n, stop_ids=[stop], on_token=on_token)

    def plain_one(client, on_token):
        return client.generate(prompt_ids=REQUESTS[2][0], max_new_tokens=REQUESTS[2][1], on_token=on_token)

    run = Staggered(rt, 3, after_tokens=1)
    left, stopped, other = run.run([vanishing, stopping, plain_one])
    assert isinstance(left, ConnectionAbortedError) and gone.is_set()
    assert isinstance(stopped, GenerationDone) and stopped.finish_reason == "stop"
    assert stopped.token_ids == references[0][:references[0].index(stop) + 1]
    assert isinstance(other, GenerationDone) and other.token_ids == references[2]
    with rt.client() as client:
        deadline = time.monotonic() + WAIT_S
        while (client.stats()["requests_peer_gone"] or 0) == before or client.health().running is not None:
            assert time.monotonic() < deadline, "the vanished client's request never left the batch"
            client.health()  # a round trip to the coordinator between looks (no sleep)
        assert client.stats()["requests_peer_gone"] == before + 1


def test_max_batch_must_be_positive(checkpoint):
    """Refused before anything starts."""
    done = subprocess.run([sys.executable, "launch.py", "--model-path", str(checkpoint), "--max-batch", "0",
                           "--prompt-ids", "1,2"], capture_output=True, text=True, timeout=WAIT_S,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 2 and "--max-batch must be >= 1" in done.stderr


def test_the_default_batch_and_where_it_is_one():
    """Batching is the default; with the routing predictor, which follows one request at a time, it defaults to one,
    and asking for more with it is refused."""
    from launch import DEFAULT_MAX_BATCH, build_parser, check_serving_flags, max_batch

    def parsed(*flags: str):
        return build_parser().parse_args(list(flags))

    assert max_batch(parsed()) == DEFAULT_MAX_BATCH > 1
    assert max_batch(parsed("--max-batch", "3")) == 3
    assert max_batch(parsed("--routing-predictor", "r.npz")) == 1
    assert max_batch(parsed("--record-trace", "t.npz")) == DEFAULT_MAX_BATCH  # recording follows each request
    assert check_serving_flags(parsed("--routing-predictor", "r.npz"), "ipc:///x") is None
    assert "does not work with --routing-predictor" in (
        check_serving_flags(parsed("--routing-predictor", "r.npz", "--max-batch", "2"), "ipc:///x") or "")


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
                                 sockets=SimpleNamespace(answer_ping=lambda msg: None))
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
    worker = SimpleNamespace(backend=backend, model=model, recorder=None,
                             sockets=SimpleNamespace(answer_ping=lambda msg: None),
                             finished=lambda *args: ended.append(args))
    loop = StepLoop(worker, 4, 8, on_configure=lambda msg: None)  # type: ignore[arg-type]
    rows = [Sequence(RequestId(i), [1, 2], 4, set(), LogitsProcessorList(), None, None, 0)  # type: ignore[arg-type]
            for i in range(2)]
    assert loop.forward(rows, None) is not None
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
