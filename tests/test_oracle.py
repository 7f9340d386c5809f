"""The correctness oracle: the offloaded runtime produces exactly the greedy tokens of plain transformers."""

from __future__ import annotations

import numpy as np
import pytest

from shm.expert_store import HostExpertStore
from shm.layout import ExpertLayout
from shm.segment import Segment
from tests.conftest import NEW_TOKENS, PROMPT_IDS, PROMPT_TEXT

# cache sizes from top_k (4) to all experts (6 layers x 32 = 192); promoe also at other lookaheads
CASES = [
    ("ondemand", 4, 2), ("ondemand", 192, 2),
    ("lru", 4, 2), ("lru", 24, 2), ("lru", 192, 2),
    ("lfu", 4, 2), ("lfu", 24, 2),
    ("promoe", 4, 2), ("promoe", 24, 2), ("promoe", 192, 2), ("promoe", 24, 1), ("promoe", 8, 3),
]
ALL_EXPERTS = 192


def start_flags(policy: str, cache_experts: int, lookahead: int) -> tuple[str, ...]:
    """One runtime per lookahead (a start-up flag): a lookahead with one case starts with that case's flags; the
    others allocate every expert's slot, and each case sets its policy and size at run time."""
    if [case for case in CASES if case[2] == lookahead] != [(policy, cache_experts, lookahead)]:
        policy, cache_experts = "lru", ALL_EXPERTS
    return ("--policy", policy, "--cache-experts", str(cache_experts), "--lookahead", str(lookahead),
            "--link-gbps", "20")


@pytest.mark.parametrize(("policy", "cache_experts", "lookahead"), sorted(CASES, key=lambda case: case[2]))
def test_runtime_matches_transformers(runtime_keeper, checkpoint, reference, policy, cache_experts, lookahead):
    rt = runtime_keeper.serving(checkpoint, start_flags(policy, cache_experts, lookahead), policy, cache_experts)
    with rt.client() as client:
        by_ids = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
        by_text = client.generate(prompt=PROMPT_TEXT, max_new_tokens=NEW_TOKENS)
    assert by_ids.token_ids == reference["ids"]
    assert by_text.token_ids == reference["text"]
    assert by_ids.metrics["experts_loaded"] > 0
    assert by_ids.metrics["cache_experts"] == cache_experts
    if cache_experts == 4 or policy == "ondemand":
        assert by_text.metrics["experts_loaded"] > 0  # nothing survives between requests at this size
    if policy == "promoe":
        assert by_ids.metrics["prefetch_precision"] is not None, "the predictor made no prediction"
    else:
        assert by_ids.metrics["prefetch_precision"] is None


def test_oracle_fails_when_experts_are_swapped(runtime_factory, reference):
    """Swapping experts in the host store must change the tokens: the oracle can fail."""
    rt = runtime_factory("--policy", "lru", "--cache-experts", "192")
    (config,) = rt.root.glob("promoe-run-*/runtime.json")
    import json

    layout = ExpertLayout.from_json(json.loads(config.read_text())["layout"])
    segment = Segment.attach(f"promoe_{rt.run_id}_store")
    store = HostExpertStore(segment, layout)
    try:
        for layer in range(len(layout.moe_layers)):
            for expert in range(0, layout.experts_per_layer, 2):
                a, b = layout.expert_id(layer, expert), layout.expert_id(layer, expert + 1)
                tmp = store.expert(a).clone()
                store.expert(a).copy_(store.expert(b))
                store.expert(b).copy_(tmp)
        assert not np.array_equal(store.expert(0).float().numpy(), store.expert(1).float().numpy())
    finally:
        store.close()
    with rt.client() as client:
        swapped = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
    assert swapped.token_ids != reference["ids"]
