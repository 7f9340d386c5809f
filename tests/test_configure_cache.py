"""``configure_cache``: switching policy, cache size and the promoe mechanisms between requests.

Unit level: the settings and their validation, the coordinator's wait for the cache to settle, the cache
directory's reconfiguration (empty, first ``n`` slots only), and the loader's whole-expert mode. End to end on the
shared ``serving`` runtime (which is left as it was found): every switch gives exactly the oracle tokens, the
metrics and the slot table show the new size, bad values and a request in flight are refused, and the server keeps
serving.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.cache import FREE
from coordinator.client import RequestFailed
from coordinator.configure import CacheConfigurator, CacheSettings
from protocol.codec import decode
from protocol.messages import (
    CacheConfigured,
    ConfigureCache,
    ConfigureInference,
    ConfigureLoader,
    ErrorReported,
    Generate,
    GenerationDone,
    Message,
)
from shm.layout import ExpertLayout
from shm.segment import Segment
from shm.slot_table import SlotTable
from tests.conftest import NEW_TOKENS, PROMPT_IDS
from tests.test_cache import Rig as CacheRig
from tests.test_loader import Rig as LoaderRig

START = CacheSettings(policy="lru", cache_experts=48, early_preemption=True, reordered_inference=True,
                      chunked_loads=True, prefetch=True)


# ---------------------------------------------------------------- settings
def test_settings_keep_what_is_not_given_and_refuse_values_out_of_range() -> None:
    new = START.updated(ConfigureCache(policy="promoe", cache_experts=12, chunked_loads=False), top_k=4, max_slots=48)
    assert new == CacheSettings("promoe", 12, True, True, False, True)
    assert new.reply(48) == CacheConfigured(policy="promoe", cache_experts=12, max_cache_experts=48,
                                            early_preemption=True, reordered_inference=True, chunked_loads=False,
                                            prefetch=True)
    assert START.reply(48).prefetch is False, "prefetch is in force only under promoe"
    assert new.updated(ConfigureCache(prefetch=False), 4, 48).for_inference() == ConfigureInference(
        hidden_states=False, reordered_inference=True)
    for bad, why in ((ConfigureCache(policy="mru"), "policy"), (ConfigureCache(cache_experts=3), "cache_experts"),
                     (ConfigureCache(cache_experts=49), "allocated at start")):
        with pytest.raises(ValueError, match=why):
            START.updated(bad, top_k=4, max_slots=48)


class StubCache:
    def __init__(self, layout: ExpertLayout) -> None:
        self.layout = layout
        self.idle = False
        self.calls: list[tuple[str, int, bool]] = []

    def reconfigure(self, policy: Any, n_slots: int, early_preemption: bool) -> None:
        assert self.idle, "reconfigured while loads were in flight"
        self.calls.append((policy.name, n_slots, early_preemption))


class StubSocket:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, frame: bytes, flags: int = 0) -> None:
        self.sent.append(decode(frame))


async def test_configure_waits_for_the_cache_to_settle_and_holds_the_queue_meanwhile() -> None:
    from protocol.config import RuntimeConfig

    layout = ExpertLayout(moe_layers=(0, 1), experts_per_layer=8, top_k=2, hidden_size=8, intermediate_size=4,
                          storage_dtype="float32", compute_dtype="float32", n_chunks=3, n_slots=16)
    cfg = RuntimeConfig(run_id="x", run_dir="/tmp", checkpoint="", layout=layout, policy="lru", device="cpu",
                        bind="", link_gbps=None, lookahead=2, predictor_path=None, load_timeout_s=1.0,
                        supervisor_pid=0)
    cache, sockets = StubCache(layout), {"inference": StubSocket(), "loader": StubSocket()}
    replies: list[Message] = []
    applied: list[bool] = []
    configurator = CacheConfigurator(cfg, cache, sockets, lambda env, msg: replies.append(msg) or True,  # type: ignore[arg-type]
                                     lambda: applied.append(True))
    configurator.request([b"peer"], ConfigureCache(policy="promoe", cache_experts=4, reordered_inference=False), None)
    assert replies == [] and configurator.pending is not None, "loads in flight: it waits"
    configurator.try_apply()
    assert replies == [] and cache.calls == []
    configurator.request([b"other"], ConfigureCache(policy="lfu"), None)
    assert isinstance(replies[-1], ErrorReported) and replies[-1].code == "busy"
    cache.idle = True
    configurator.try_apply()
    assert cache.calls == [("promoe", 4, True)] and applied == [True]
    assert isinstance(replies[-1], CacheConfigured) and replies[-1].cache_experts == 4
    assert sockets["inference"].sent == [ConfigureInference(hidden_states=True, reordered_inference=False)]
    assert sockets["loader"].sent == [ConfigureLoader(chunked_loads=True)]
    configurator.request([b"peer"], ConfigureCache(cache_experts=5), "1 request(s) running, 0 queued")
    assert isinstance(replies[-1], ErrorReported) and replies[-1].code == "busy" and len(cache.calls) == 1
    configurator.request([b"peer"], ConfigureCache(cache_experts=17), None)
    assert isinstance(replies[-1], ErrorReported) and replies[-1].code == "bad_request"
    await asyncio.sleep(0)


# ---------------------------------------------------------------- the cache directory
@pytest.fixture
def make_cache_rig() -> Iterator[Callable[[int], CacheRig]]:
    rigs: list[CacheRig] = []

    def make(n_slots: int) -> CacheRig:
        rigs.append(CacheRig(n_slots, "lru"))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


def test_reconfigure_empties_the_cache_and_then_uses_the_first_slots_only(make_cache_rig) -> None:
    rig = make_cache_rig(6)
    rig.use(0, 1, at=(0, 0))
    rig.use(8, 9, at=(0, 1))
    rig.use(16, 17, at=(0, 2))
    assert len(rig.resident()) == 6 and rig.cache.idle
    from coordinator.policies import make_policy

    rig.cache.reconfigure(make_policy("lfu", rig.layout), 2, early_preemption=False)
    assert rig.resident() == set() and all(rig.state_of_slot(s) == FREE for s in range(6))
    assert rig.cache.policy.name == "lfu" and not rig.cache.early_preemption
    for step in range(3):
        rig.use(24 + step, 25 + step, at=(step + 1, 3))
        used = {s for s in range(6) if rig.state_of_slot(s) != FREE}
        assert used <= {0, 1}, f"slots {used} in use with a cache of 2"


def test_reconfigure_refuses_a_busy_cache(make_cache_rig) -> None:
    rig = make_cache_rig(3)
    rig.gate(0, 1, at=(0, 0))  # loads in flight
    assert not rig.cache.idle
    from coordinator.policies import make_policy

    with pytest.raises(RuntimeError, match="idle"):
        rig.cache.reconfigure(make_policy("lru", rig.layout), 2, True)


# ---------------------------------------------------------------- the loader
@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunked", [True, False])
def test_whole_expert_loads_read_the_inbox_only_between_experts(tmp_path: Path, chunked: bool) -> None:
    from protocol.messages import ExpertLoaded, LoadsPreempted, Preempt
    from workers.bootstrap import send

    rig = LoaderRig(tmp_path)
    try:
        rig.loader.on_configure_loader(ConfigureLoader(chunked_loads=chunked))
        first = rig.load(1, slot=0, expert=1)
        rig.deliver()
        assert rig.loader.between_loads()
        assert rig.loader.serve_step()  # chunk 0 of 3
        assert rig.loader.between_loads() == chunked
        send(rig.to_loader, Preempt(load_ids=[first.load_id]))
        assert rig.inbox.poller.poll(5000), "the preemption did not arrive"
        steps = 0
        while rig.loader.serve_step():
            steps += 1
            assert steps < 10
        rig.deliver()
        if chunked:  # read before the next chunk: dropped with one chunk landed
            assert [e.chunks_done for e in rig.events(LoadsPreempted)] == [[1]]
            assert rig.events(ExpertLoaded) == []
        else:  # read only once the whole expert had landed: too late to drop anything
            assert rig.events(LoadsPreempted) == []
            assert [e.load_id for e in rig.events(ExpertLoaded)] == [first.load_id]
            rig.assert_slot_holds(0, 1)
    finally:
        rig.close()


# ---------------------------------------------------------------- end to end, on the shared serving runtime
def run_config(serving: Any) -> tuple[dict, SlotTable]:
    (config,) = serving.root.glob("promoe-run-*/runtime.json")
    data = json.loads(config.read_text())
    lay = ExpertLayout.from_json(data["layout"])
    table = SlotTable(Segment.attach(f"promoe_{data['run_id']}_table"), lay.n_slots, lay.n_experts, lay.n_chunks,
                      init=False)
    return data, table


@pytest.mark.timeout(240)
def test_switching_policy_and_size_at_run_time_keeps_the_oracle_tokens(serving, reference) -> None:
    data, table = run_config(serving)
    allocated = data["layout"]["n_slots"]
    try:
        with serving.client() as client:
            done_before = client.stats()["requests_done"]
            for settings in ({"policy": "promoe", "cache_experts": 24},
                             {"policy": "ondemand", "cache_experts": 8, "early_preemption": False,
                              "reordered_inference": False, "chunked_loads": False},
                             {"policy": "lfu", "cache_experts": allocated, "chunked_loads": True}):
                reply = client.configure_cache(**settings)
                assert reply.cache_experts == settings["cache_experts"] and reply.max_cache_experts == allocated
                assert reply.policy == settings["policy"]
                done = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
                assert done.token_ids == reference["ids"], settings
                assert done.metrics["cache_experts"] == settings["cache_experts"]
                assert done.metrics["experts_loaded"] > 0, "the cache was emptied"
                if settings["policy"] == "promoe":
                    assert done.metrics["prefetch_precision"] is not None
                used = {s for s in range(allocated) if int(table.slot_expert[s]) >= 0}
                assert max(used) < settings["cache_experts"], f"slots {sorted(used)} used, {settings}"
            for bad in ({"policy": "mru"}, {"cache_experts": 3}, {"cache_experts": allocated + 1}):
                with pytest.raises(RequestFailed) as info:
                    client.configure_cache(**bad)
                assert info.value.code == "bad_request"
            assert client.stats()["requests_done"] == done_before + 3, "totals are not reset"
            assert all(client.health().workers.values())
    finally:
        table.close()
        with serving.client() as client:  # leave the shared runtime as the other tests expect it
            client.configure_cache(policy="lru", cache_experts=allocated, early_preemption=True,
                                   reordered_inference=True, chunked_loads=True, prefetch=True)


@pytest.mark.timeout(120)
def test_configure_cache_is_refused_while_a_request_runs(serving, reference) -> None:
    with serving.client() as client:
        client.send(Generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS))
        client.send(ConfigureCache(cache_experts=8))  # same connection: handled right after the generate started
        replies = []
        while not any(isinstance(r, GenerationDone) for r in replies):
            replies.append(client.receive(60))
        (refused,) = [r for r in replies if isinstance(r, ErrorReported)]
        assert refused.code == "busy" and "between requests" in refused.message
        done = next(r for r in replies if isinstance(r, GenerationDone))
        assert done.token_ids == reference["ids"]
        assert done.metrics["cache_experts"] == 48, "the refused configuration changed nothing"
        assert client.configure_cache(cache_experts=48).cache_experts == 48, "accepted once idle"
