"""The live view's snapshot (``DescribeCache``) over a real cache directory: resident, loading, predicted and
recently evicted experts per MoE layer, and the running request's metrics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from coordinator.cache_view import by_layer, describe_cache
from coordinator.metrics import Totals
from protocol.codec import decode, encode
from protocol.ids import ExpertId, RequestId
from tests.test_cache import E, Rig, loads_in


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig(n_slots=3, policy="promoe")
    try:
        yield made
    finally:
        made.close()


def test_by_layer_splits_flat_ids():
    assert by_layer([ExpertId(e) for e in (2 * E + 5, 1, 0, 2 * E)], 4, E) == [[0, 1], [], [0, 5], []]


def test_snapshot_shows_each_state_where_it_is(rig: Rig):
    request = RequestId(7)
    rig.cache.begin_request(request)
    first = loads_in(rig.gate(1, 2, at=(0, 0)))
    assert [c.expert for c in first] == [1, 2]
    rig.loaded(first[0])
    spec = loads_in(rig.predict(0, 1, E + 3))  # a guess for layer 1: speculative load of expert 3 there
    assert [c.expert for c in spec] == [E + 3]
    rig.predict(0, 3, 3 * E + 6)  # no slot left for this one: predicted, not loading
    snap = describe_cache(rig.cache, Totals(), 2.0, request, 0.5, 10.0)
    assert snap.resident == [[1], [], [], []]
    assert snap.loading == [[2], [3], [], []]
    assert snap.predicted == [[], [3], [], [6]]
    assert snap.evicted == [[], [], [], []]
    assert (snap.request_id, snap.step, snap.layer, snap.policy, snap.cache_experts) == (request, 0, 0, "promoe", 3)
    assert snap.request["experts_loaded"] == 1 and snap.request["link_utilisation"] is not None
    assert decode(encode(snap)) == snap  # within the declared schema

    rig.loaded(first[1])
    rig.loaded(spec[0])
    rig.unpin(1, 2)
    rig.use(2 * E + 4, 2 * E + 5, at=(0, 2))  # layer 2's gate: two slots needed, evictions follow
    snap = describe_cache(rig.cache, Totals(), None, None, 0.0, 11.0)
    evicted = {(layer, e) for layer, experts in enumerate(snap.evicted) for e in experts}
    resident = {(layer, e) for layer, experts in enumerate(snap.resident) for e in experts}
    assert {(2, 4), (2, 5)} <= resident and len(resident) == 3
    assert len(evicted) == 2 and not evicted & resident
    assert evicted <= {(0, 1), (0, 2), (1, 3)}
    assert (snap.request_id, snap.request, snap.step) == (None, {}, -1)  # no request running: no request metrics
    assert snap.predicted[3] == [6]  # still ahead of layer 2
