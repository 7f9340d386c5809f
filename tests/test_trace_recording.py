"""``launch.py --record-trace FILE [--record-hidden]``: live routing written in the traces' format, the same routing
transformers computes, readable by ``bench/replay.py``."""

from __future__ import annotations

import itertools
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
    rt = runtime_factory("--policy", "lru", "--cache-experts", "48", "--record-trace", str(path), "--record-hidden",
                         "--max-batch", "1")  # generate(); the step loop's recording is the next test's
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


def test_requests_batched_together_are_recorded_each_as_its_own_prompt(runtime_factory, reference, checkpoint,
                                                                          tmp_path) -> None:
    """With continuous batching (the default) two requests run together, one prompt prefilled in chunks of 5 tokens
    beside the other's decoding: each is recorded as its own prompt, its positions in order, the prefill's routing
    that of transformers, padding recorded for no one."""
    import threading

    path = tmp_path / "batched.npz"
    rt = runtime_factory("--policy", "lru", "--cache-experts", "48", "--record-trace", str(path), "--record-hidden",
                         "--prefill-chunk", "5")
    asks = [(PROMPT_IDS, NEW_TOKENS), (PROMPT_IDS[:6], 6)]
    done: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        with rt.client() as client:
            done[i] = client.generate(prompt_ids=asks[i][0], max_new_tokens=asks[i][1]).token_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert done.get(0) == reference["ids"] and len(done.get(1, [])) == 6
    data = np.load(path)
    offsets = data["prompt_offsets"].tolist()
    ids = data["model_token_ids"].tolist()
    recorded = sorted(ids[a:b] for a, b in itertools.pairwise(offsets))
    assert recorded == sorted([*prompt, *done[i][:-1]] for i, (prompt, _) in enumerate(asks))
    a = next(a for a, b in itertools.pairwise(offsets) if b - a == len(PROMPT_IDS) + NEW_TOKENS - 1)
    expected, _ = plain_routing(checkpoint, PROMPT_IDS)
    np.testing.assert_array_equal(np.sort(data["experts"][a:a + len(PROMPT_IDS)], axis=-1), np.sort(expected, axis=-1))
    assert data["hidden"].shape[:2] == data["experts"].shape[:2] and np.isfinite(data["hidden"]).all()


def test_a_batched_pass_is_filed_under_its_requests_and_padding_under_none(tmp_path) -> None:
    """The recorder alone: a prefill pass of two rows (widths 3 and 2, padded to 3), then a decode pass of both;
    each request's routing comes out in its own positions' order, the padding nowhere; a failed one is dropped."""
    from workers.trace_recorder import TraceRecorder

    rec = TraceRecorder(tmp_path / "t.npz", n_moe_layers=2, experts_per_layer=8, record_hidden=False)
    index = torch.tensor([[0, 1], [1, 2], [2, 3], [4, 5], [5, 6], [7, 7]])  # [6 = 2 rows x 3, k=2]; row 1's last: pad
    rec.begin_pass([(10, torch.tensor([0, 1, 2])), (11, torch.tensor([3, 4]))])
    for layer in range(2):
        rec.on_routing(layer, 0, index + layer, torch.zeros(6, 4))
    rec.begin_pass([(10, torch.tensor([0])), (11, torch.tensor([1])), (12, torch.tensor([2]))])
    for layer in range(2):
        rec.on_routing(layer, 1, torch.tensor([[3, 4], [6, 7], [0, 0]]) + layer, torch.zeros(3, 4))
    rec.drop(12)
    rec.end_sequence(11, [5, 6], [9, 1])
    rec.end_sequence(10, [1, 2, 3], [8, 2])
    rec.flush()
    data = np.load(tmp_path / "t.npz")
    assert data["prompt_offsets"].tolist() == [0, 3, 7]
    assert data["model_token_ids"].tolist() == [5, 6, 9, 1, 2, 3, 8]
    experts = data["experts"]  # [7, L=2, k=2]
    assert experts[:, 0].tolist() == [[4, 5], [5, 6], [6, 7], [0, 1], [1, 2], [2, 3], [3, 4]]
    assert (experts[:, 1] == experts[:, 0] + 1).all()


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
