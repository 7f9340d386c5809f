"""Every supported architecture, from a sharded ``save_pretrained`` checkpoint: the offloaded runtime produces
exactly the greedy tokens of plain transformers (eager experts), for token ids and for a chat-template prompt, and
streams text that adds up to the final text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.checkpoint import open_checkpoint
from models.skeleton import experts_modules
from models.text import encode_prompt
from tests.conftest import PROMPT_IDS

CHAT_PROMPT = "caf\u00e9?"
NEW_TOKENS = 8


def reference_tokens(checkpoint: Path, dtype: torch.dtype) -> dict[str, list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, experts_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    out = {}
    for name, ids in (("ids", PROMPT_IDS), ("chat", encode_prompt(tokenizer, CHAT_PROMPT, chat=True))):
        prompt = torch.tensor([ids])
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                   do_sample=False)
        out[name] = generated[0, len(ids):].tolist()
    return out


@pytest.fixture(scope="session")
def tiny_references(tiny_checkpoints: dict[str, Path]) -> dict[str, dict[str, list[int]]]:
    refs = {arch: reference_tokens(path, torch.float32) for arch, path in tiny_checkpoints.items()}
    for arch, ref in refs.items():
        assert len(set(ref["ids"] + ref["chat"])) > 2, f"{arch}: the oracle needs varying greedy output"
    return refs


def test_adapters_find_exactly_the_moe_layers_transformers_builds(tiny_checkpoints):
    """The adapter's MoE layers (dense layers skipped) are those where transformers puts an experts module."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for arch, path in tiny_checkpoints.items():
        ckpt = open_checkpoint(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        with_experts = tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
        assert ckpt.moe_layers() == with_experts, arch
        assert len(with_experts) < len(model.model.layers) or arch == "mixtral", f"{arch}: test a dense layer"
        layout = ckpt.layout(n_slots=2, n_chunks=3, compute_dtype="float32")
        assert [m.gate_up_proj.shape[0] for m in experts_modules(model, layout.moe_layers)] == [8] * len(with_experts)
        assert len(ckpt.files) > 2, f"{arch}: the checkpoint should be sharded"


# every architecture under both policies; each sees a small and a full cache (the default model's oracle covers
# the whole policy x size grid); one case computes in bfloat16 against transformers in bfloat16
CASES = [("qwen2_moe", "lru", "small", "float32"), ("qwen2_moe", "promoe", "full", "float32"),
         ("qwen3_moe", "promoe", "small", "float32"), ("qwen3_moe", "lru", "full", "bfloat16"),
         ("mixtral", "lru", "small", "float32"), ("mixtral", "promoe", "full", "float32"),
         ("deepseek_v2", "promoe", "small", "float32"), ("deepseek_v2", "lru", "full", "float32")]


@pytest.mark.parametrize(("arch", "policy", "cache", "dtype"), sorted(CASES, key=lambda case: (case[0], case[3])))
def test_architecture_matches_transformers(runtime_keeper, tiny_checkpoints, tiny_references, arch, policy, cache,
                                           dtype):
    ckpt = open_checkpoint(tiny_checkpoints[arch])
    layout = ckpt.layout(n_slots=2, n_chunks=1, compute_dtype="float32")
    n_slots = layout.top_k if cache == "small" else layout.n_experts
    expected = tiny_references[arch] if dtype == "float32" else reference_tokens(tiny_checkpoints[arch],
                                                                                 getattr(torch, dtype))
    # one runtime per (architecture, dtype) with every expert's slot allocated; each case sets policy and size
    rt = runtime_keeper.serving(tiny_checkpoints[arch], ("--policy", "lru", "--cache-experts", str(layout.n_experts),
                                                         "--link-gbps", "20", "--dtype", dtype), policy, n_slots)
    deltas: list[str] = []
    with rt.client() as client:
        by_ids = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
        chat = client.generate(prompt=CHAT_PROMPT, chat=True, max_new_tokens=NEW_TOKENS,
                               on_token=lambda t: deltas.append(t.text))
    assert f"computing in {dtype} on CPU" in rt.log_path.read_text()
    assert by_ids.token_ids == expected["ids"]
    assert chat.token_ids == expected["chat"]
    assert by_ids.metrics["experts_loaded"] > 0
    assert chat.text is not None and chat.text.startswith("".join(deltas))
    assert "\ufffd" not in "".join(deltas)[-1:], "a delta ended inside a multi-byte character"


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2"])
def test_routing_trace_and_predictor_training_work_for_every_architecture(tmp_path, tiny_checkpoints, arch):
    """The router hooks of ``--train-predictor`` find every MoE layer (dense layers skipped) and record real
    choices; the trained file loads for the runtime's predictor."""
    from transformers import AutoModelForCausalLM

    from training.predictor_training import LearnedPredictor, TrainingConfig, collect_trace, train_predictor

    ckpt = open_checkpoint(tiny_checkpoints[arch])
    layout = ckpt.layout(n_slots=2, n_chunks=1, compute_dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32, experts_implementation="eager")
    trace = collect_trace(model, layout.moe_layers, list(range(256)) * 2, 64)
    assert trace.chosen.shape == (len(layout.moe_layers), 8, 64, layout.top_k)
    assert int(trace.chosen.min()) >= 0 and int(trace.chosen.max()) < layout.experts_per_layer
    assert len(torch.unique(trace.chosen)) > layout.top_k, "the trace should see varied routing"
    out = tmp_path / "pred.safetensors"
    rows = train_predictor(ckpt.path, out, None, TrainingConfig(tokens=1024, window=64, hidden_units=16, epochs=1))
    assert len(rows) == 3 * len(layout.moe_layers)
    learned = LearnedPredictor(out, layout.hidden_size, layout.experts_per_layer)
    assert learned.predict(torch.zeros(1, layout.hidden_size), 0, 1) is not None
