"""``bench/replay.py``: the runtime's cache code replayed against a model of the device.

Small synthetic traces (bursty routing over 4 MoE layers x 8 experts, top-2) so that the whole file runs in seconds;
the figures on the real trace are the benchmark's, not the tests'.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bench.belady import belady_misses
from bench.replay import (
    POLICIES,
    Config,
    Predicted,
    Trace,
    cached_predictions,
    main,
    oracle_predictions,
    replay,
    run_config,
)
from bench.replay_model import DeviceProfile, HostProfile, ReplayModel

L, E, K = 4, 8, 2
FIELDS = {"policy", "cache_fraction", "cache_experts", "hit_rate", "bytes_per_token", "stall_ms_per_token", "tpot_ms",
          "floor_tpot_ms"}


def synthetic_trace(n_prompts: int = 8, tokens: int = 24, seed: int = 0) -> Trace:
    """Each prompt prefers a few experts per layer (as real prompts do), with some noise."""
    rng = np.random.default_rng(seed)
    experts = []
    for _ in range(n_prompts):
        favourite = rng.integers(0, E, size=(L, 3))
        for _ in range(tokens):
            row = []
            for layer in range(L):
                pool = favourite[layer] if rng.random() < 0.8 else np.arange(E)
                row.append(rng.choice(np.unique(pool), size=K, replace=False) if len(np.unique(pool)) >= K
                           else rng.choice(E, size=K, replace=False))
            experts.append(row)
    offsets = np.arange(0, n_prompts * tokens + 1, tokens, dtype=np.int64)
    token_ids = rng.integers(0, 50, size=n_prompts * tokens)
    return Trace(np.array(experts, dtype=np.uint8), token_ids, offsets, E)


def plain_belady(accesses: list[list[int]], capacity: int) -> int:
    """Farthest next use first, by scanning (quadratic): the reference for the heap implementation."""
    resident: set[int] = set()
    misses = 0
    flat = [(i, e) for i, a in enumerate(accesses) for e in dict.fromkeys(a)]
    for pos, (i, expert) in enumerate(flat):
        if expert in resident:
            continue
        misses += 1
        if len(resident) >= capacity:
            now = set(accesses[i])  # used by this same access: kept
            next_use = {e: next((p for p, (_, x) in enumerate(flat) if p > pos and x == e), 1 << 30)
                        for e in resident - now}
            resident.remove(max(next_use, key=lambda e: next_use[e]))
        resident.add(expert)
    return misses


def test_belady_heap_matches_the_plain_definition() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        accesses = [sorted(rng.choice(10, size=2, replace=False).tolist()) for _ in range(30)]
        for capacity in (2, 4, 7):
            assert belady_misses(accesses, capacity) == plain_belady(accesses, capacity)


def test_rows_are_complete_deterministic_and_above_the_floor() -> None:
    trace = synthetic_trace()
    profile = DeviceProfile(link_gbps=25.0, compute_ms=0.5, expert_nbytes=4_600_000)
    rows = replay(trace, 0.5, [0.25, 0.5], profile, lookahead=(2,), policies=POLICIES, predictor="none")
    assert rows == replay(trace, 0.5, [0.25, 0.5], profile, lookahead=(2,), policies=POLICIES, predictor="none")
    assert {(r["policy"], r["cache_fraction"]) for r in rows} == {
        (p, f) for p in (*POLICIES, "belady") for f in (0.25, 0.5)}
    for row in rows:
        assert row.keys() >= FIELDS, row
        assert row["tpot_ms"] >= row["floor_tpot_ms"] - 1e-9, row
        assert row["tpot_ms"] == pytest.approx(L * 0.5 + row["stall_ms_per_token"]), row
        belady = next(r for r in rows if r["policy"] == "belady" and r["cache_fraction"] == row["cache_fraction"])
        assert row["hit_rate"] <= belady["hit_rate"] + 1e-9, row
    ondemand = [r for r in rows if r["policy"] == "ondemand"]
    assert all(r["hit_rate"] == 0 for r in ondemand), "ondemand keeps nothing between gates"
    lru = {r["cache_fraction"]: r for r in rows if r["policy"] == "lru"}
    assert lru[0.5]["hit_rate"] > lru[0.25]["hit_rate"] > 0


def run_model(policy: str, trace: Trace, profile: DeviceProfile, predict=None) -> tuple[ReplayModel, float]:
    model = ReplayModel(policy, 12, L, E, K, profile, lookahead=2, predict=predict)
    result = model.run(trace.experts, trace.prompt_offsets.tolist())
    return model, result.stall_ms / result.tokens


def test_a_fast_link_hides_every_load_and_a_perfect_predictor_hides_more_than_lru() -> None:
    trace = synthetic_trace(n_prompts=4)
    fast = DeviceProfile(link_gbps=1e6, compute_ms=0.5, expert_nbytes=4_600_000)
    for policy in POLICIES:
        assert run_model(policy, trace, fast)[1] == pytest.approx(0.0, abs=1e-3), policy

    def oracle(t: int, layer: int, distance: int) -> tuple[list[int], list[float]]:
        target = layer + distance
        t, target = t + target // L, target % L
        in_prompt = t < len(trace.experts) and t not in trace.prompt_offsets.tolist()
        return (trace.experts[t, target].tolist(), [1.0] * K) if in_prompt else ([], [])

    balanced = DeviceProfile(link_gbps=25.0, compute_ms=0.5, expert_nbytes=4_600_000)
    model, stall_oracle = run_model("promoe", trace, balanced, oracle)
    _, stall_lru = run_model("lru", trace, balanced)
    assert model.result.predicted > 0 and model.result.predicted_chosen == model.result.predicted
    assert stall_oracle < 0.5 * stall_lru, (stall_oracle, stall_lru)


def small_trace_file(tmp_path: Path) -> Path:
    """A synthetic trace of 4 prompts x 10 tokens written as the CLI reads it."""
    trace = synthetic_trace(n_prompts=4, tokens=10)
    path = tmp_path / "t.npz"
    np.savez(path, experts=trace.experts, token_ids=trace.token_ids, prompt_offsets=trace.prompt_offsets)
    return path


def test_cli_writes_the_rows_as_a_json_list(tmp_path: Path) -> None:
    path = small_trace_file(tmp_path)
    out = tmp_path / "rows.json"
    assert main(["--trace", str(path), "--cache-fractions", "0.25", "--predictor", "none", "--jobs", "1",
                 "--expert-mb", "4.6", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and {r["policy"] for r in rows} == {*POLICIES, "belady"}


def test_oracle_predictor_is_always_right_and_beats_no_prediction() -> None:
    trace = synthetic_trace(n_prompts=8)
    profile = DeviceProfile(link_gbps=25.0, compute_ms=0.5, expert_nbytes=4_600_000)
    rows = {r["policy"] + ":" + predictor: r
            for predictor in ("none", "oracle")
            for r in replay(trace, 0.5, [0.5], profile, lookahead=(2,), policies=("promoe",), predictor=predictor)}
    assert rows["promoe:oracle"]["precision"] == 1.0 and rows["promoe:none"]["precision"] is None
    assert rows["promoe:oracle"]["tpot_ms"] < rows["promoe:none"]["tpot_ms"]


def test_predictions_are_kept_for_their_trace_and_made_again_for_another(tmp_path: Path) -> None:
    """``--predictions``: a second run with the same key reads the file instead of fitting; another key fits."""
    _, test = synthetic_trace(n_prompts=4).split(0.5)
    made: list[int] = []

    def make(distance: int) -> Callable[[], Predicted]:
        def fit() -> Predicted:
            made.append(distance)
            return oracle_predictions(test, (distance,))
        return fit

    path = tmp_path / "predictions.npz"
    first = cached_predictions(path, "trace a", make(2))
    again = cached_predictions(path, "trace a", make(2))
    assert made == [2], "the second run read the file"
    assert set(again.top) == {2} and np.array_equal(again.outlook, first.outlook)
    assert all(np.array_equal(a, b) for a, b in zip(again.top[2], first.top[2], strict=True))
    other = cached_predictions(path, "trace b", make(3))
    assert made == [2, 3] and set(other.top) == {3}
    assert set(cached_predictions(path, "trace b", make(3)).top) == {3} and made == [2, 3]


def test_an_outlook_of_every_expert_one_token_on_keeps_more_of_what_is_used() -> None:
    """The oracle's outlook (1 for what the next gate of each layer chooses, 0 for the rest) steers eviction: more
    hits than the same predictions without it, on a cache too small for the working set."""
    _, test = synthetic_trace(n_prompts=8, tokens=40).split(0.5)
    profile = DeviceProfile(link_gbps=25.0, compute_ms=0.5, expert_nbytes=17_300_000)
    predicted = oracle_predictions(test, (2,))
    without, with_outlook = (run_config(Config("promoe", 0.25, profile, (2,), outlook), test, predicted)
                             for outlook in (False, True))
    assert with_outlook["hit_rate"] > without["hit_rate"] + 0.03
    assert with_outlook["tpot_ms"] < without["tpot_ms"]


HOST_FIELDS = {"host_compute", "host_experts_per_token", "host_ms_per_token", "host_predicted_ms_per_token"}
LINK_BOUND = DeviceProfile(link_gbps=25.0, compute_ms=0.5, expert_nbytes=17_300_000)


def host_rows(policy: str, modes: tuple[str, ...], profile: DeviceProfile = LINK_BOUND) -> dict[str, dict]:
    _, test = synthetic_trace(n_prompts=6, tokens=20).split(0.5)
    predicted = oracle_predictions(test, (2,)) if policy == "promoe" else None
    return {mode: run_config(Config(policy, 0.25, profile, (2,), host_compute=mode), test, predicted)
            for mode in modes}


def test_never_reproduces_the_replay_without_host_compute_exactly() -> None:
    """The figures of the replay before host compute existed (commit c35aa13, same trace and profile)."""
    before = {"lru": (0.5395833333333333, 63721659.3, 2.1569916666666895, 4.1569916666666895),
              "promoe": (0.6666666666666666, 61799437.3, 1.362594444444457, 3.362594444444457)}
    for policy, expected in before.items():
        row = host_rows(policy, ("never",))["never"]
        assert row.keys() >= (FIELDS - {"floor_tpot_ms"}) | HOST_FIELDS
        assert (row["hit_rate"], row["bytes_per_token"], row["stall_ms_per_token"], row["tpot_ms"]) == expected
        assert row["host_experts_per_token"] == 0 and row["host_ms_per_token"] == 0


def test_always_computes_every_miss_on_the_host_and_the_layer_waits_for_it() -> None:
    """lru never loads then: every layer is the gate, K host computations one after another, the rest."""
    row = host_rows("lru", ("always",))["always"]
    host_ms = LINK_BOUND.host.expert_ms(LINK_BOUND.expert_nbytes)
    layer_ms = (1 - LINK_BOUND.routed_fraction) * 0.5 + K * host_ms
    assert row["bytes_per_token"] == 0 and row["hit_rate"] == 0
    assert row["host_experts_per_token"] == L * K
    assert row["host_ms_per_token"] == pytest.approx(L * K * host_ms)
    assert row["tpot_ms"] == pytest.approx(L * layer_ms)
    assert row["stall_ms_per_token"] == pytest.approx(L * (layer_ms - 0.5))


@pytest.mark.parametrize("policy", ["lru", "promoe"])
def test_auto_on_a_link_bound_profile_beats_the_link_alone_and_the_host_alone(policy: str) -> None:
    """A host of 30 GB/s (0.63 ms per expert against a 0.69 ms copy): at the default 40 GB/s, promoe's prefetches
    leave so few misses that sending every one of them to the host is within 1% of the cost model's choice."""
    rows = host_rows(policy, ("never", "auto", "always"), dataclasses.replace(LINK_BOUND, host=HostProfile(gbps=30)))
    assert rows["auto"]["stall_ms_per_token"] < rows["never"]["stall_ms_per_token"] - 0.3
    assert rows["auto"]["stall_ms_per_token"] < rows["always"]["stall_ms_per_token"] - 0.05
    assert 0 < rows["auto"]["host_experts_per_token"] < rows["always"]["host_experts_per_token"]
    assert rows["auto"]["bytes_per_token"] < rows["never"]["bytes_per_token"]
    # the cost model, once it measured the host, predicted each host call's time
    assert rows["auto"]["host_predicted_ms_per_token"] == pytest.approx(rows["auto"]["host_ms_per_token"], rel=0.1)


def test_auto_with_a_slow_host_tries_it_once_and_then_leaves_it() -> None:
    slow = DeviceProfile(link_gbps=25.0, compute_ms=0.5, expert_nbytes=17_300_000, host=HostProfile(gbps=1.0))
    rows = host_rows("lru", ("never", "auto"), slow)
    tokens = 60
    assert rows["auto"]["host_experts_per_token"] * tokens == pytest.approx(1)  # the one measurement
    extra_ms = (rows["auto"]["tpot_ms"] - rows["never"]["tpot_ms"]) * tokens
    assert 0 <= extra_ms <= slow.host.expert_ms(slow.expert_nbytes)


def test_cli_replays_each_host_compute_setting(tmp_path: Path) -> None:
    path = small_trace_file(tmp_path)
    out = tmp_path / "rows.json"
    assert main(["--trace", str(path), "--cache-fractions", "0.25", "--predictor", "none", "--jobs", "1",
                 "--policies", "lru", "--host-compute", "never,auto", "--host-gbps", "30", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["policy"], r.get("host_compute")) for r in rows} == {("lru", "never"), ("lru", "auto"),
                                                                     ("belady", None)}
