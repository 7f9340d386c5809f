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


def test_the_default_batch():
    """Batching is the default, with every predictor; ``--max-batch`` sets it."""
    from launch import DEFAULT_MAX_BATCH, build_parser, check_serving_flags, max_batch

    def parsed(*flags: str):
        return build_parser().parse_args(list(flags))

    assert max_batch(parsed()) == DEFAULT_MAX_BATCH > 1
    assert max_batch(parsed("--max-batch", "3")) == 3
    assert max_batch(parsed("--routing-predictor", "r.npz")) == DEFAULT_MAX_BATCH
    assert max_batch(parsed("--record-trace", "t.npz")) == DEFAULT_MAX_BATCH  # recording follows each request
    assert check_serving_flags(parsed("--routing-predictor", "r.npz", "--max-batch", "2"), "ipc:///x") is None
