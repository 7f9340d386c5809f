# ruff: noqa: F811  (``model`` and ``references`` are tests/test_batch.py's fixtures, imported by name for pytest)
"""The routing predictor in the live runtime (``--routing-predictor``): ``predict_at`` is ``probabilities`` for one
position, the predictor worker's handler (history, wrap into the next token, the prefill, stale requests), the
inference worker's feed, and one runtime that serves exactly transformers' tokens while predictions and outlooks
reach the coordinator."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.client_messages import GenerationDone
from protocol.ids import RequestId
from protocol.messages import BatchRouted, ExpertsPredicted, GateRouted, Message, OutlookPredicted
from shm.layout import ExpertLayout
from tests.conftest import NEW_TOKENS, PROMPT_IDS
from tests.test_batch import REQUESTS, Staggered, model, references  # noqa: F401
from tests.test_routing_predictor import chained_trace
from training.routing_predictor import RoutingPredictor
from workers.predictor import target_of
from workers.routing_live import (
    FORGET_PASSES,
    KEEP_TOKENS,
    PREFILL_TOKENS,
    LiveRoutingPredictor,
    PassRow,
    RoutingFeed,
)

L, E, K = 4, 8, 2


@pytest.fixture(scope="module")
def predictor() -> RoutingPredictor:
    trace = chained_trace(n_prompts=6)
    return RoutingPredictor.fit(trace.experts, trace.token_ids, trace.prompt_offsets, E, distances=(1, 2, L),
                                epochs=1, batch=64, hidden=32, min_steps=30, threads=1)


def layout(n_layers: int = L, per_layer: int = E, top_k: int = K) -> ExpertLayout:
    return ExpertLayout(moe_layers=tuple(range(n_layers)), experts_per_layer=per_layer, top_k=top_k, hidden_size=1,
                        intermediate_size=1, storage_dtype="bfloat16", compute_dtype="bfloat16", n_chunks=1,
                        n_slots=top_k)


def test_predict_at_is_probabilities_at_one_position(predictor: RoutingPredictor) -> None:
    """The last three tokens of a prompt are all a position's features read: row for row the same numbers (up to
    float rounding: one row through the MLP instead of a batch)."""
    trace = chained_trace(n_prompts=2, seed=3)
    for d in (1, 2, L):
        probs = predictor.probabilities(trace.experts, trace.token_ids, trace.prompt_offsets, d)  # [N, L, E]
        for start, end in zip(trace.prompt_offsets[:-1], trace.prompt_offsets[1:], strict=True):
            for t in range(start, end):
                first = max(start, t - 2)
                for layer in range(L):
                    at = predictor.predict_at(trace.experts[first: t + 1], trace.token_ids[first: t + 1], layer, (d,))
                    np.testing.assert_allclose(at[d], probs[t, layer], rtol=0, atol=1e-6)


def gate(request: int, step: int, layer: int, ids: list[int], experts: np.ndarray) -> GateRouted:
    keep = min(len(ids), KEEP_TOKENS)
    return GateRouted(request_id=RequestId(request), step=step, layer=layer, n_tokens=len(ids),
                      token_ids=ids[-keep:], experts=experts[-keep:, layer].tolist())


def serve_request(live: LiveRoutingPredictor, request: int, prompt: list[int], generated: list[int],
                  routing: np.ndarray) -> None:
    """Report ``routing [len(prompt) + len(generated), L, K]`` gate by gate, as the inference worker does."""
    p = len(prompt)
    for layer in range(L):
        live.on_gate_routed(gate(request, 0, layer, prompt, routing[:p]))
    for s, token in enumerate(generated, start=1):
        for layer in range(L):
            live.on_gate_routed(gate(request, s, layer, [token], routing[p + s - 1: p + s]))


def test_the_handler_predicts_from_the_last_tokens_and_wraps_into_the_next(predictor: RoutingPredictor) -> None:
    sent: list[Message] = []
    live = LiveRoutingPredictor(layout(), predictor, 2, sent.append)
    trace = chained_trace(n_prompts=1, tokens=9, seed=5)
    ids = trace.token_ids.tolist()
    serve_request(live, 1, ids[:6], ids[6:], trace.experts)
    predicted = [m for m in sent if isinstance(m, ExpertsPredicted)]
    outlooks = [m for m in sent if isinstance(m, OutlookPredicted)]
    assert len(predicted) == len(outlooks) == 4 * L  # one of each per gate
    for m in outlooks:
        assert len(m.probabilities) == E
    for s in (1, 2, 3):  # decode: from the token and the two before it, at the lookahead and at L
        t = 6 + s - 1
        for layer in range(L):
            target = target_of(s, layer, 2, L)
            m = predicted[s * L + layer]  # one per gate, in order
            assert (m.step, m.layer) == target
            expected = predictor.predict_at(trace.experts[t - 2: t + 1], trace.token_ids[t - 2: t + 1], layer, (2, L))
            best = np.argsort(-expected[2], kind="stable")[:K]
            assert [e - target[1] * E for e in m.experts] == best.tolist()
            np.testing.assert_allclose(m.probabilities, expected[2][best], rtol=1e-6)
            (o,) = [o for o in outlooks if (o.step, o.layer) == (s + 1, layer)]
            np.testing.assert_allclose(o.probabilities, expected[L], rtol=1e-6)
    wrapped = predicted[L + L - 1]  # step 1, last layer: the next token's layer 1
    assert (wrapped.step, wrapped.layer) == (2, 1) and all(E <= e < 2 * E for e in wrapped.experts)
    assert live.calls == 4 * L and live.total_ns > 0


def test_inside_the_prefill_the_last_prompt_tokens_are_unioned(predictor: RoutingPredictor) -> None:
    sent: list[Message] = []
    live = LiveRoutingPredictor(layout(), predictor, 1, sent.append)
    trace = chained_trace(n_prompts=1, tokens=10, seed=6)
    prompt = trace.token_ids.tolist()
    live.on_gate_routed(gate(1, 0, 0, prompt, trace.experts))
    (m,) = [x for x in sent if isinstance(x, ExpertsPredicted)]
    assert (m.step, m.layer) == (0, 1)
    none = np.ones(E)
    named: set[int] = set()
    for t in range(10 - PREFILL_TOKENS, 10):  # each as a prompt's first token: its later layers are not known yet
        q = predictor.predict_at(trace.experts[t: t + 1], trace.token_ids[t: t + 1], 0, (1,))[1]
        none *= 1 - q
        named.update(np.argsort(-q, kind="stable")[:K].tolist())
    local = [e - E for e in m.experts]  # layer 1's
    assert sorted(local) == sorted(named) and len(local) <= PREFILL_TOKENS * K
    np.testing.assert_allclose(m.probabilities, (1 - none)[local], rtol=1e-6)
    assert m.probabilities == sorted(m.probabilities, reverse=True)


def test_stale_requests_and_gaps_send_nothing(predictor: RoutingPredictor) -> None:
    sent: list[Message] = []
    live = LiveRoutingPredictor(layout(), predictor, 2, sent.append)
    trace = chained_trace(n_prompts=1, tokens=6, seed=7)
    ids = trace.token_ids.tolist()
    live.on_gate_routed(gate(2, 0, 0, ids[:4], trace.experts))
    sent.clear()
    live.on_gate_routed(gate(1, 1, 0, ids[4:5], trace.experts[4:5]))  # a late report of an earlier request
    assert sent == [] and live.dropped == 1
    live.on_gate_routed(gate(2, 0, 2, ids[:4], trace.experts))  # layer 1 never came: no prediction this step
    live.on_gate_routed(gate(2, 0, 3, ids[:4], trace.experts))
    assert sent == []
    live.on_gate_routed(gate(2, 1, 0, ids[4:5], trace.experts[4:5]))  # whole again from the next step on
    assert {type(m) for m in sent} == {ExpertsPredicted, OutlookPredicted}
    assert all(m.request_id == 2 for m in sent)


def test_a_predictor_behind_its_inbox_records_and_predicts_from_the_newest(predictor: RoutingPredictor) -> None:
    sent: list[Message] = []
    waiting = [True]
    live = LiveRoutingPredictor(layout(), predictor, 2, sent.append, behind=lambda: waiting[0])
    trace = chained_trace(n_prompts=1, tokens=6, seed=8)
    ids = trace.token_ids.tolist()
    serve_request(live, 1, ids[:4], ids[4:5], trace.experts)
    assert sent == [] and live.shed == 2 * L
    waiting[0] = False
    live.on_gate_routed(gate(1, 2, 0, ids[5:6], trace.experts[5:6]))
    expected = predictor.predict_at(trace.experts[3:6], trace.token_ids[3:6], 0, (L,))[L]
    (outlook,) = [m for m in sent if isinstance(m, OutlookPredicted)]
    np.testing.assert_allclose(outlook.probabilities, expected, rtol=1e-6)


def batch_gate(step: int, layer: int, rows: list[tuple[int, int, list[int], np.ndarray]],
               key: int = 1) -> BatchRouted:
    """A pass's gate report as the step loop's feed sends it; rows: (request, position of the first token, the
    row's token ids in the pass, their routing ``[T, L, K]``)."""
    sent = [min(len(ids), KEEP_TOKENS) for _, _, ids, _ in rows]
    return BatchRouted(request_id=RequestId(key), step=step, layer=layer,
                       requests=[RequestId(r) for r, _, _, _ in rows],
                       positions=[pos + len(ids) - n for (_, pos, ids, _), n in zip(rows, sent, strict=True)],
                       n_tokens=[len(ids) for _, _, ids, _ in rows],
                       token_ids=[ids[-n:] for (_, _, ids, _), n in zip(rows, sent, strict=True)],
                       experts=[x[-n:, layer].tolist() for (_, _, _, x), n in zip(rows, sent, strict=True)])


def union_of(predictor: RoutingPredictor, windows: list[tuple[np.ndarray, np.ndarray]], layer: int,
             d: int) -> tuple[list[int], np.ndarray]:
    """The rows' top-K union (most likely first) and each expert's probability that some row chooses it."""
    none = np.ones(E)
    named: set[int] = set()
    for experts, ids in windows:
        q = predictor.predict_at(experts, ids, layer, (d,))[d]
        none *= 1 - q
        named.update(np.argsort(-q, kind="stable")[:K].tolist())
    any_p = 1 - none
    return sorted(named, key=lambda e: (-any_p[e], e)), any_p


def test_a_batched_pass_predicts_what_any_of_its_rows_will_choose(predictor: RoutingPredictor) -> None:
    """Two requests prefilled together in one pass (chunks of 5), then decoded together: each keeps its own
    history; the pass's prediction is the union of the rows' top-k with the probability that some row chooses each
    expert, and so is the outlook; a prefill row's target inside its pass is predicted from its last token alone."""
    sent: list[Message] = []
    live = LiveRoutingPredictor(layout(), predictor, 2, sent.append)
    trace = chained_trace(n_prompts=2, tokens=8, seed=9)
    a, b = trace.experts[:8].astype(np.int64), trace.experts[8:].astype(np.int64)
    ia, ib = trace.token_ids[:8], trace.token_ids[8:]
    for layer in range(L):  # step 0: both prompts' first five tokens
        live.on_batch_routed(batch_gate(0, layer, [(5, 0, ia[:5].tolist(), a[:5]), (6, 0, ib[:5].tolist(), b[:5])]))
    first = next(m for m in sent if isinstance(m, ExpertsPredicted))  # layer 0 -> layer 2 of the same pass
    experts, any_p = union_of(predictor, [(a[4:5], ia[4:5]), (b[4:5], ib[4:5])], 0, 2)
    assert (first.request_id, first.step, first.layer) == (1, 0, 2)
    assert [e - 2 * E for e in first.experts] == experts
    np.testing.assert_allclose(first.probabilities, any_p[experts], rtol=1e-6)
    for step, t in ((1, 5), (2, 6)):  # decoded together, a token each
        sent.clear()
        for layer in range(L):
            live.on_batch_routed(batch_gate(step, layer, [(5, t, [int(ia[t])], a[t: t + 1]),
                                                          (6, t, [int(ib[t])], b[t: t + 1])]))
        predicted = [m for m in sent if isinstance(m, ExpertsPredicted)]
        outlooks = [m for m in sent if isinstance(m, OutlookPredicted)]
        assert len(predicted) == len(outlooks) == L
        windows = [(a[t - 2: t + 1], ia[t - 2: t + 1]), (b[t - 2: t + 1], ib[t - 2: t + 1])]
        for layer in range(L):
            target = target_of(step, layer, 2, L)
            m = predicted[layer]
            assert (m.request_id, m.step, m.layer) == (1, *target)
            experts, any_p = union_of(predictor, windows, layer, 2)
            assert [e - target[1] * E for e in m.experts] == experts
            np.testing.assert_allclose(m.probabilities, any_p[experts], rtol=1e-6)
            _, outlook = union_of(predictor, windows, layer, L)
            assert (outlooks[layer].step, outlooks[layer].layer) == (step + 1, layer)
            np.testing.assert_allclose(outlooks[layer].probabilities, outlook, rtol=1e-6)
    assert live.calls == 3 * L


def test_a_batched_pass_with_a_gap_predicts_again_from_the_next_pass(predictor: RoutingPredictor) -> None:
    """A lost report breaks the pass for its rows until their next pass; a row whose positions do not follow (a
    chunk longer than reported) starts its history again; a request in no pass for long is forgotten."""
    sent: list[Message] = []
    live = LiveRoutingPredictor(layout(), predictor, 1, sent.append)
    trace = chained_trace(n_prompts=1, tokens=8, seed=10)
    x, ids = trace.experts.astype(np.int64), trace.token_ids
    for layer in (0, 2, 3):  # layer 1 never came
        live.on_batch_routed(batch_gate(0, layer, [(5, 0, ids[:3].tolist(), x[:3])]))
    assert len(sent) == 2  # layer 0's prediction and outlook, nothing after the gap
    sent.clear()
    live.on_batch_routed(batch_gate(1, 0, [(5, 3, [int(ids[3])], x[3:4])]))  # whole again, from its own token
    (m,) = [m for m in sent if isinstance(m, ExpertsPredicted)]
    experts, _ = union_of(predictor, [(x[3:4], ids[3:4])], 0, 1)
    assert [e - E for e in m.experts] == experts
    assert live.rows[RequestId(5)].next_position == 4
    live.on_batch_routed(batch_gate(2, 0, [(5, 6, [int(ids[6])], x[6:7])]))  # positions 4 and 5 never reported
    assert len(live.rows[RequestId(5)].token_ids) == 1
    live.on_batch_routed(batch_gate(3 + FORGET_PASSES, 0, [(7, 0, [1], x[:1])]))
    assert set(live.rows) == {RequestId(7)}
    live.on_batch_routed(batch_gate(0, 0, [(8, 0, [1], x[:1])], key=8))  # a new batch: its passes count from 0
    assert set(live.rows) == {RequestId(8)}
    live.on_batch_routed(batch_gate(9, 0, [(5, 0, [1], x[:1])], key=1))  # a batch older than the one in hand
    assert live.dropped == 1


def test_the_feed_reports_each_rows_last_tokens_of_a_pass() -> None:
    sent: list[Message] = []
    feed = RoutingFeed(sent.append, enabled=True)
    rows = [PassRow(RequestId(5), 0, [10, 11, 12, 13, 14, 15], [0, 1, 2, 3, 4, 5]),  # a prefill chunk of 6
            PassRow(RequestId(6), 4, [20, 21], [6, 7])]  # the next chunk of a longer prompt, padded to 6
    feed.begin_pass(RequestId(5), rows)
    feed.on_routing(2, 7, torch.arange(24).view(12, 2), torch.zeros(12, 1))
    assert sent == [BatchRouted(request_id=RequestId(5), step=7, layer=2, requests=[RequestId(5), RequestId(6)],
                                positions=[2, 4], n_tokens=[6, 2], token_ids=[[12, 13, 14, 15], [20, 21]],
                                experts=[[[4, 5], [6, 7], [8, 9], [10, 11]], [[12, 13], [14, 15]]])]
    feed.end_pass()  # the pass is over: generate()'s reports again
    feed.begin_request(RequestId(8), [1, 2])
    feed.on_routing(0, 0, torch.tensor([[3, 4], [5, 6]]), torch.zeros(2, 1))
    assert isinstance(sent[-1], GateRouted) and sent[-1].request_id == 8


def test_a_predictor_of_another_shape_is_refused(predictor: RoutingPredictor) -> None:
    with pytest.raises(ValueError, match="MoE layers"):
        LiveRoutingPredictor(layout(n_layers=L + 1), predictor, 2, lambda m: None)


def test_launch_refuses_a_routing_predictor_for_another_model(predictor: RoutingPredictor, tmp_path: Path) -> None:
    from launch import check_routing_predictor

    predictor.save(tmp_path / "p.npz")
    args = argparse.Namespace(routing_predictor=tmp_path / "p.npz", predictor=None)
    check_routing_predictor(args, layout())
    with pytest.raises(SystemExit, match="is for 4 MoE layers x 8 experts"):
        check_routing_predictor(args, layout(per_layer=E * 2))
    with pytest.raises(SystemExit, match="not both"):
        check_routing_predictor(argparse.Namespace(routing_predictor=tmp_path / "p.npz", predictor=tmp_path), layout())
    with pytest.raises(SystemExit, match="cannot read it"):
        check_routing_predictor(argparse.Namespace(routing_predictor=tmp_path / "none.npz", predictor=None), layout())


def test_the_feed_reports_each_steps_last_tokens_and_their_ids() -> None:
    sent: list[Message] = []
    feed = RoutingFeed(sent.append, enabled=True)
    feed.begin_request(RequestId(3), [5, 6, 7, 8, 9, 10])
    feed.on_routing(1, 0, torch.arange(12).view(6, 2), torch.zeros(6, 1))
    feed.on_token(42)
    feed.on_routing(0, 1, torch.tensor([[3, 4]]), torch.zeros(1, 1))
    assert sent == [
        GateRouted(request_id=RequestId(3), step=0, layer=1, n_tokens=6, token_ids=[7, 8, 9, 10],
                   experts=[[4, 5], [6, 7], [8, 9], [10, 11]]),
        GateRouted(request_id=RequestId(3), step=1, layer=0, n_tokens=1, token_ids=[42], experts=[[3, 4]])]
    feed.enabled = False
    feed.on_routing(1, 1, torch.tensor([[3, 4]]), torch.zeros(1, 1))
    assert len(sent) == 2


def test_serving_with_the_routing_predictor_gives_transformers_tokens(runtime_factory, reference, references,
                                                                      tmp_path: Path) -> None:
    """A predictor for the default model's shape (6 MoE layers x 32 experts, top-4), fitted on random routing:
    what it predicts changes loads only, never a token, one request alone or several batched together."""
    rng = np.random.default_rng(0)
    experts = np.stack([rng.permutation(32)[:4] for _ in range(6 * 120)]).reshape(120, 6, 4)
    fitted = RoutingPredictor.fit(experts, rng.integers(0, 256, 120), np.array([0, 60, 120]), 32, distances=(2, 6),
                                  epochs=1, hidden=16, min_steps=5, threads=1)
    fitted.save(tmp_path / "routing.npz")
    rt = runtime_factory("--policy", "promoe", "--cache-experts", "48", "--link-gbps", "5", "--routing-predictor",
                         str(tmp_path / "routing.npz"), "--record-trace", str(tmp_path / "rec.npz"),
                         "--max-batch", "4", "--prefill-chunk", "5")
    with rt.client() as client:
        done = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
        totals = client.stats()
    assert done.token_ids == reference["ids"]
    assert done.metrics["prefetch_precision"] is not None
    assert totals["predictions_received"] > 0 and totals["outlooks_received"] > 0
    # several requests batched: each gets the tokens of transformers alone while the pass's predictions arrive
    run = Staggered(rt, 3)
    results = run.run([lambda client, on_token, ids=ids, n=n: client.generate(prompt_ids=ids, max_new_tokens=n,
                                                                              on_token=on_token)
                       for ids, n in REQUESTS[:3]])
    for i, result in enumerate(results):
        assert isinstance(result, GenerationDone), f"request {i}: {result!r}"
        assert result.token_ids == references[i], f"request {i}"
    assert run.overlapped(0, 1) and run.overlapped(0, 2), "the requests did not run in one batch"
    with rt.client() as client:
        after = client.stats()
    assert after["predictions_received"] > totals["predictions_received"]
    assert after["outlooks_received"] > totals["outlooks_received"]
    # the trace recorder shares the gate hook with the feed: both are served
    recorded = np.load(tmp_path / "rec.npz")
    assert recorded["model_token_ids"][: len(PROMPT_IDS) + NEW_TOKENS - 1].tolist() == [*PROMPT_IDS,
                                                                                        *reference["ids"][:-1]]


def test_rows_at_one_position_are_the_rows_of_the_whole_prompt(predictor: RoutingPredictor) -> None:
    """The live path's features (plain integers, one position) are exactly ``_rows``'s at that position."""
    from training.routing_predictor import _Features, _rows, _rows_at

    trace = chained_trace(n_prompts=2, seed=5)
    shape, features = predictor.shape, _Features(predictor.shape)
    for d in (1, 2, L, L + 1):
        rows, _, target_layer = _rows(shape, trace.experts, trace.token_ids, trace.prompt_offsets, d)
        for start, end in zip(trace.prompt_offsets[:-1], trace.prompt_offsets[1:], strict=True):
            for t in range(start, end):
                first = max(start, t - 2)
                for layer in range(L):
                    at, target = _rows_at(shape, features, trace.experts[first: t + 1], trace.token_ids[first: t + 1],
                                          layer, d)
                    assert at == rows[t, layer].tolist() and target == target_layer[t, layer], (d, t, layer)


def test_rows_of_a_batch_of_windows_are_each_windows_rows(predictor: RoutingPredictor) -> None:
    """The batched live path's features (left-padded windows of 1 to 3 real tokens) are row for row ``_rows_at``'s
    of each window alone, and its probabilities ``predict_at``'s."""
    from training.routing_predictor import _Features, _rows_at, _rows_batch

    trace = chained_trace(n_prompts=1, tokens=40, seed=11)
    shape, features = predictor.shape, _Features(predictor.shape)
    rng = np.random.default_rng(0)
    ends = rng.integers(1, 40, size=12)
    known = np.minimum(rng.integers(1, 4, size=12), ends)  # real tokens of each window
    experts = np.zeros((12, 3, L, K), dtype=np.int64)
    ids = np.zeros((12, 3), dtype=np.int64)
    for i, (end, n) in enumerate(zip(ends, known, strict=True)):
        experts[i, 3 - n:] = trace.experts[end - n: end]
        ids[i, 3 - n:] = trace.token_ids[end - n: end]
    for d in (1, 2, L, L + 1):
        for layer in range(L):
            rows, target = _rows_batch(shape, features, experts, ids, known, layer, d)
            for i, (end, n) in enumerate(zip(ends, known, strict=True)):
                alone, alone_target = _rows_at(shape, features, trace.experts[end - n: end],
                                               trace.token_ids[end - n: end], layer, d)
                assert rows[i].tolist() == alone and target == alone_target, (d, layer, i)
            probs = predictor.predict_windows(experts, ids, known, layer, d)
            for i, (end, n) in enumerate(zip(ends, known, strict=True)):
                at = predictor.predict_at(trace.experts[end - n: end], trace.token_ids[end - n: end], layer, (d,))
                np.testing.assert_allclose(probs[i], at[d], rtol=0, atol=1e-6)
