"""``training/routing_predictor.py``: what it learns, that it never looks ahead of the layer it predicts from, and
that a fit is reproducible and survives a save and load.

Synthetic routing over 4 MoE layers x 8 experts, top-2, small enough to fit in about a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.replay import Trace, replay
from bench.replay_model import DeviceProfile
from training.routing_predictor import RoutingPredictor

L, E, K = 4, 8, 2


def chained_trace(n_prompts: int = 12, tokens: int = 30, seed: int = 0) -> Trace:
    """Layer ``l + 1`` chooses a fixed function of layer ``l``'s experts (and the next token's first layer one of the
    last layer's): a predictor that reads the gates can be exact; popularity alone cannot."""
    rng = np.random.default_rng(seed)
    step = rng.permutation(E)  # expert e at layer l -> step[e] at layer l + 1
    experts = np.zeros((n_prompts * tokens, L, K), dtype=np.uint8)
    for p in range(n_prompts):
        current = rng.choice(E, size=K, replace=False)
        for t in range(tokens):
            for layer in range(L):
                experts[p * tokens + t, layer] = current
                current = step[current]
            if rng.random() < 0.2:  # a fresh start now and then, so that the chain is not periodic per prompt
                current = rng.choice(E, size=K, replace=False)
    offsets = np.arange(0, n_prompts * tokens + 1, tokens, dtype=np.int64)
    return Trace(experts, rng.integers(0, 40, size=n_prompts * tokens), offsets, E)


def precision(predictor: RoutingPredictor, trace: Trace, distance: int, skip_wrapped: bool = True) -> float:
    probs = predictor.probabilities(trace.experts, trace.token_ids, trace.prompt_offsets, distance)  # [N, L, E]
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :K]  # [N, L, K]
    hits, total = 0, 0
    for t in range(len(trace.experts)):
        for layer in range(L):
            ahead = layer + distance
            if skip_wrapped and ahead >= L:
                continue
            true = trace.experts[t + ahead // L, ahead % L] if t + ahead // L < len(trace.experts) else None
            if true is None:
                continue
            hits += len(set(top[t, layer].tolist()) & set(true.tolist()))
            total += K
    return hits / total


@pytest.fixture(scope="module")
def fitted() -> tuple[RoutingPredictor, Trace, Trace]:
    train, test = chained_trace().split(0.5)
    predictor = RoutingPredictor.fit(train.experts, train.token_ids, train.prompt_offsets, E, distances=(1, 2),
                                     epochs=6, batch=64, hidden=64, threads=1)
    return predictor, train, test


def test_it_learns_routing_that_follows_from_the_gates_already_run(fitted: tuple) -> None:
    predictor, _, test = fitted
    assert precision(predictor, test, 1) > 0.9
    assert precision(predictor, test, 2) > 0.9  # popularity would name about K / E = 0.25 of them


def test_probabilities_are_probabilities() -> None:
    train, test = chained_trace(n_prompts=6).split(0.5)
    predictor = RoutingPredictor.fit(train.experts, train.token_ids, train.prompt_offsets, E, distances=(1,),
                                     epochs=2, batch=64, hidden=32, threads=1)
    probs = predictor.probabilities(test.experts, test.token_ids, test.prompt_offsets, 1)
    assert probs.shape == (len(test.experts), L, E) and probs.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()


def test_a_prediction_reads_nothing_the_runtime_does_not_know_yet(fitted: tuple) -> None:
    """Changing the routing of later layers of the same token, and of every later token, leaves a prediction made at
    layer ``l`` as it was."""
    predictor, _, test = fitted
    rng = np.random.default_rng(1)
    t, layer = 20, 1
    for distance in (1, 2, 4):
        before = predictor.probabilities(test.experts, test.token_ids, test.prompt_offsets, distance)[t, layer]
        future = test.experts.copy()
        future[t, layer + 1:] = rng.integers(0, E, size=future[t, layer + 1:].shape)
        future[t + 1:] = rng.integers(0, E, size=future[t + 1:].shape)
        tokens = test.token_ids.copy()
        tokens[t + 1:] = rng.integers(0, 40, size=len(tokens) - t - 1)
        after = predictor.probabilities(future, tokens, test.prompt_offsets, distance)[t, layer]
        np.testing.assert_array_equal(before, after)
        past = test.experts.copy()
        past[t, layer] = (past[t, layer] + 1) % E  # what it does read: this layer's gate
        assert not np.array_equal(before, predictor.probabilities(past, tokens, test.prompt_offsets,
                                                                  distance)[t, layer])


def test_a_fit_is_reproducible_and_survives_save_and_load(fitted: tuple, tmp_path: Path) -> None:
    predictor, train, test = fitted
    again = RoutingPredictor.fit(train.experts, train.token_ids, train.prompt_offsets, E, distances=(1, 2),
                                 epochs=6, batch=64, hidden=64, threads=1)
    args = (test.experts, test.token_ids, test.prompt_offsets, 2)
    np.testing.assert_array_equal(predictor.probabilities(*args), again.probabilities(*args))
    predictor.save(tmp_path / "p.npz")
    loaded = RoutingPredictor.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(predictor.probabilities(*args), loaded.probabilities(*args))
    assert float(loaded.net.temperature) == float(predictor.net.temperature)


def test_replay_with_the_routing_predictor_reports_its_precision() -> None:
    trace = chained_trace()
    profile = DeviceProfile(link_gbps=25.0, compute_ms=0.5, expert_nbytes=4_600_000, n_chunks=3)
    rows = replay(trace, 0.5, [0.5], profile, lookahead=(2,), policies=("lru", "promoe"), predictor="routing",
                  fit_options={"hidden": 64, "batch": 64, "threads": 1})
    promoe = next(r for r in rows if r["policy"] == "promoe")
    lru = next(r for r in rows if r["policy"] == "lru")
    assert promoe["precision"] > 0.8
    assert promoe["tpot_ms"] < lru["tpot_ms"]
