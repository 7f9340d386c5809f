"""Prediction and prefetching: the hidden-state exchange, skip-layer gate reuse, and the metrics end to end."""

from __future__ import annotations

import uuid

import pytest
import torch

from shm.hidden_exchange import HiddenExchange
from shm.segment import Segment
from tests.conftest import NEW_TOKENS, PROMPT_IDS
from workers.predictor import GateReusePredictor, target_of


@pytest.fixture
def exchange():
    segment = Segment.create(f"promoe_test_{uuid.uuid4().hex[:10]}_hidden", HiddenExchange.nbytes_for(3, 8, 4))
    ex = HiddenExchange(segment, n_layers=3, hidden_size=8, max_tokens=4)
    try:
        yield ex
    finally:
        ex.close()
        segment.unlink()


def test_hidden_exchange_round_trip_keeps_the_last_rows(exchange):
    hidden = torch.arange(6 * 8, dtype=torch.float32).view(6, 8)
    assert exchange.write(1, request_id=7, step=3, hidden=hidden) == 4
    rows = exchange.read(1, request_id=7, step=3)
    assert torch.equal(rows, hidden[-4:])
    assert exchange.read(0, request_id=7, step=3) is None  # another layer was never written


def test_hidden_exchange_refuses_overwritten_and_half_written_records(exchange):
    exchange.write(2, request_id=1, step=0, hidden=torch.ones(1, 8))
    exchange.write(2, request_id=1, step=1, hidden=torch.zeros(1, 8))
    assert exchange.read(2, request_id=1, step=0) is None  # the layer moved on to step 1
    assert torch.equal(exchange.read(2, request_id=1, step=1), torch.zeros(1, 8))
    exchange._header[2, 0] += 1  # a writer in the middle of its copy
    assert exchange.read(2, request_id=1, step=1) is None


def test_gate_reuse_is_the_target_layers_own_gate():
    torch.manual_seed(0)
    routers = torch.randn(4, 16, 8)  # [layers, E, H]
    hidden = torch.randn(3, 8)  # [tokens, H]
    predicted = GateReusePredictor(routers, top_k=2).predict(hidden, target_layer=2)
    expected = sorted(set(torch.topk(hidden @ routers[2].T, 2, dim=-1).indices.flatten().tolist()))
    assert predicted == expected
    assert len(predicted) <= 6


@pytest.mark.parametrize(("step", "layer", "lookahead", "expected"), [
    (0, 0, 2, (0, 2)), (0, 3, 2, (0, 5)), (0, 4, 2, (1, 0)), (5, 5, 1, (6, 0)), (2, 5, 3, (3, 2))])
def test_the_last_layers_predict_the_first_layers_of_the_next_token(step, layer, lookahead, expected):
    assert target_of(step, layer, lookahead, n_layers=6) == expected


def test_promoe_reports_prediction_metrics(runtime_factory, reference):
    rt = runtime_factory("--policy", "promoe", "--cache-experts", "48", "--link-gbps", "5")
    with rt.client() as client:
        done = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
        again = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
        totals = client.stats()
    assert done.token_ids == again.token_ids == reference["ids"]
    m = done.metrics
    assert 0 < m["prefetch_precision"] <= 1
    assert 0 < m["prefetch_recall"] <= 1
    assert 0 <= m["fetch_rate"] <= 1
    assert m["goodpred"] == pytest.approx(m["prefetch_precision"] * m["fetch_rate"])
    assert 0 < m["link_utilisation"] <= 1.05  # paced copies cannot beat the emulated link
    # totals: the two requests' shares, plus what was still in flight when each reply left
    assert (totals["requests_done"], totals["requests_failed"]) == (2, 0)
    assert totals["tokens_generated"] == 2 * NEW_TOKENS
    assert totals["expert_uses"] == m["expert_uses"] + again.metrics["expert_uses"]
    assert totals["bytes_loaded"] >= m["bytes_loaded"] + again.metrics["bytes_loaded"]
    assert totals["wasted_bytes"] >= m["wasted_bytes"] + again.metrics["wasted_bytes"]
    assert 0 < totals["goodpred"] <= 1
