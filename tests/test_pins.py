"""The inference worker is the only writer of the pins: it clears them all when it starts (a predecessor that died
mid-request leaves its pins set) and when a request ends, before the request's report goes out."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from multiprocessing import resource_tracker
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from protocol.config import RuntimeConfig
from protocol.ids import ExpertId, RequestId
from protocol.messages import GenerationFailed, GenerationFinished, Message, SamplingParams, StartGeneration
from shm.layout import ExpertLayout
from shm.segment import Segment
from shm.slot_table import SlotTable
from workers import inference
from workers.inference import BadRequest, InferenceWorker, open_table

LAYOUT = ExpertLayout(moe_layers=(0, 1), experts_per_layer=4, top_k=2, hidden_size=8, intermediate_size=4,
                      storage_dtype="bfloat16", compute_dtype="float32", n_chunks=1, n_slots=2)
PINNED = [ExpertId(1), ExpertId(6)]


@pytest.fixture
def table(tmp_path: Path) -> Iterator[tuple[RuntimeConfig, SlotTable]]:
    """A run's slot table, with pins set as a worker that died mid-request leaves them."""
    cfg = RuntimeConfig(run_id=f"test_{uuid.uuid4().hex[:12]}", run_dir=str(tmp_path), checkpoint="", layout=LAYOUT,
                        policy="lru", device="cpu", bind="", link_gbps=None, lookahead=2, predictor_path=None,
                        load_timeout_s=5.0, supervisor_pid=0)
    segment = Segment.create(cfg.segment("table"), SlotTable.nbytes_for(LAYOUT.n_slots, LAYOUT.n_experts))
    table = SlotTable(segment, LAYOUT.n_slots, LAYOUT.n_experts, LAYOUT.n_chunks, init=True)
    table.pin(PINNED)
    try:
        yield cfg, table
    finally:
        table.close()
        segment.unlink()


def test_a_starting_inference_worker_clears_the_pins_a_dead_one_left(table) -> None:
    cfg, left = table
    assert int(left.expert_pin.sum()) == len(PINNED)
    mine = open_table(cfg)
    # Segment.attach, meant for other processes, dropped this process's (the creator's) tracker registration
    resource_tracker.register(mine.segment._shm._name, "shared_memory")  # type: ignore[attr-defined]
    try:
        assert int(left.expert_pin.sum()) == 0
    finally:
        mine.close()


FINISHED = GenerationFinished(request_id=RequestId(1), token_ids=[3], text=None, prompt_tokens=1, ttft_ms=1.0,
                              tpot_ms=1.0, stall_ms=0.0, expert_uses=2, expert_hits=2, finish_reason="length")


@pytest.mark.parametrize("outcome", ["finished", "bad_request", "internal"])
def test_a_request_s_pins_are_cleared_before_its_report_goes_out(table, monkeypatch, outcome: str) -> None:
    """Otherwise the coordinator could handle the end of a request, and start the next, with its pins still set."""
    _cfg, pins = table
    pins.clear_pins()
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=16), parameters=lambda: iter([torch.zeros(1)]))
    worker = InferenceWorker(model, None, SimpleNamespace(table=pins),  # type: ignore[arg-type]
                             SimpleNamespace(send_to_coordinator=None))  # type: ignore[arg-type]

    def generate(msg: StartGeneration) -> GenerationFinished:
        pins.pin(PINNED)  # the gates chose them; a failure leaves them pinned
        if outcome == "bad_request":
            raise BadRequest("bad_request", "no")
        if outcome == "internal":
            raise RuntimeError("boom")
        return FINISHED

    sent: list[tuple[Message, int]] = []

    def send(sock: Any, msg: Message) -> None:
        sent.append((msg, int(pins.expert_pin.sum())))

    monkeypatch.setattr(worker, "generate", generate)
    monkeypatch.setattr(inference, "send", send)
    worker.on_start_generation(StartGeneration(request_id=RequestId(1), params=SamplingParams(max_new_tokens=1),
                                                prompt_ids=[1]))
    ((report, pins_when_sent),) = sent
    assert isinstance(report, GenerationFinished if outcome == "finished" else GenerationFailed)
    assert pins_when_sent == 0, "the report went out with the request's pins still set"
