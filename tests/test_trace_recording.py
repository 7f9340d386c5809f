"""``launch.py --record-trace FILE [--record-hidden]``: live routing written in the traces' format, the same routing
transformers computes, readable by ``bench/replay.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.replay import Trace
from tests.conftest import NEW_TOKENS, PROMPT_IDS


def plain_routing(checkpoint: Path, ids: list[int]) -> tuple[np.ndarray, int]:
    """Top-k experts per MoE layer of the plain transformers model on one forward pass: ``[T, L, k]``, top_k."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, experts_implementation="eager")
    with torch.inference_mode():
        out = model(torch.tensor([ids]), output_router_logits=True)
    top_k = int(model.config.num_experts_per_tok)
    layers = [torch.topk(logits.reshape(len(ids), -1), top_k, dim=-1).indices for logits in out.router_logits]
    return torch.stack(layers, dim=1).numpy(), top_k  # [T, L, k]


def test_recorded_trace_is_the_models_routing_and_replays(runtime_factory, reference, checkpoint, tmp_path) -> None:
    path = tmp_path / "trace.npz"
    rt = runtime_factory("--policy", "lru", "--cache-experts", "48", "--record-trace", str(path), "--record-hidden")
    with rt.client() as client:
        first = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
        assert path.is_file(), "the trace is written after each request"
        second = client.generate(prompt_ids=PROMPT_IDS[:5], max_new_tokens=4)
    assert first.token_ids == reference["ids"]
    data = np.load(path)
    n_first = len(PROMPT_IDS) + NEW_TOKENS - 1  # the last generated token is never fed back
    n_second = 5 + 4 - 1
    assert data["prompt_offsets"].tolist() == [0, n_first, n_first + n_second]
    fed = [*PROMPT_IDS, *first.token_ids[:-1], *PROMPT_IDS[:5], *second.token_ids[:-1]]
    assert data["model_token_ids"].tolist() == fed
    from transformers import AutoTokenizer

    pieces = AutoTokenizer.from_pretrained(checkpoint).convert_ids_to_tokens(fed)
    assert data["vocab"][data["token_ids"]].tolist() == pieces  # token_ids index the file's own vocabulary
    experts = data["experts"]  # [N, L, k]
    expected, top_k = plain_routing(checkpoint, [*PROMPT_IDS, *first.token_ids[:-1]])
    assert experts.shape[1:] == expected.shape[1:] and experts.shape[2] == top_k
    # the same experts as transformers routes (the order within a token's top-k is the router's): exactly for the
    # prefill, which is the same computation; decode steps ran with a KV cache, one full pass here (ties may differ)
    mine, plain = np.sort(experts[:n_first], axis=-1), np.sort(expected, axis=-1)
    np.testing.assert_array_equal(mine[: len(PROMPT_IDS)], plain[: len(PROMPT_IDS)])
    assert (mine == plain).all(axis=-1).mean() > 0.95
    hidden = data["hidden"]
    assert hidden.shape[:2] == experts.shape[:2] and hidden.dtype == np.float16 and np.isfinite(hidden).all()
    trace = Trace.load(path)
    assert trace.experts_per_layer == int(data["experts_per_layer"]) and trace.top_k == top_k


def test_the_recorder_rewrites_the_file_a_logarithmic_number_of_times_and_flushes_the_rest(tmp_path) -> None:
    """Rewriting after every request made recording quadratic; the file is rewritten once it would grow by
    ``REWRITE_GROWTH``, and ``flush`` (the worker's exit) writes what is left."""
    from workers.trace_recorder import TraceRecorder

    path = tmp_path / "t.npz"
    recorder = TraceRecorder(path, n_moe_layers=2, experts_per_layer=8, record_hidden=False)
    for request in range(200):
        recorder.begin_request()
        for step in range(3):  # a 2-token prompt, then two decode steps
            for layer in range(2):
                rows = 2 if step == 0 else 1
                recorder.on_routing(layer, step, torch.full((rows, 2), (request + layer) % 8), torch.zeros(rows, 4))
        recorder.end_request([1, 2], [3, 4, 5])
        if request == 0:
            assert recorder.writes == 1 and path.is_file(), "the first request is written at once"
    assert recorder.writes < 60, f"{recorder.writes} rewrites for 200 requests"
    recorder.flush()
    data = np.load(path)
    assert data["prompt_offsets"].tolist() == list(range(0, 4 * 201, 4))  # every request, 4 positions each
    assert data["experts"].shape == (800, 2, 2)
    assert data["experts"][-1, 1].tolist() == [(199 + 1) % 8] * 2
    writes = recorder.writes
    recorder.flush()
    assert recorder.writes == writes, "nothing new: no rewrite"
