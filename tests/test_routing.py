"""Routing realism: the routing figures on hand-built traces, and training a copy of a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.model_training import ModelTrainingConfig, train_model
from training.predictor_training import Trace
from training.routing_stats import consecutive_overlap, gate_reuse_accuracy, routing_stats, top_quarter_share


def test_consecutive_overlap_counts_experts_chosen_again_by_the_next_token():
    chosen = torch.tensor([[[[0, 1], [1, 2], [3, 4]]]])  # [L=1, W=1, S=3, k=2]
    assert consecutive_overlap(chosen) == pytest.approx((1 / 2 + 0 / 2) / 2)
    assert consecutive_overlap(torch.tensor([[[[5, 6], [6, 5]]]])) == 1.0


def test_top_quarter_share_is_per_layer_then_averaged():
    uniform = torch.arange(8).view(1, 1, 4, 2)  # every expert of 8 once
    skewed = torch.tensor([[[[0, 1], [0, 1], [0, 1], [2, 3]]]])  # 0 and 1 take 6 of 8 uses
    assert top_quarter_share(uniform, 8) == pytest.approx(2 / 8)
    assert top_quarter_share(skewed, 8) == pytest.approx(6 / 8)
    assert top_quarter_share(torch.cat([uniform, skewed]), 8) == pytest.approx((2 / 8 + 6 / 8) / 2)


def test_gate_reuse_is_the_target_gate_on_the_source_input():
    torch.manual_seed(0)
    layers, positions, hidden_size, experts, k = 3, 16, 8, 6, 2
    routers = torch.randn(layers, experts, hidden_size)
    hidden = torch.randn(layers, 1, positions, hidden_size)  # [L, W, S, H]
    chosen = torch.stack([(hidden[max(0, layer - 1)] @ routers[layer].T).topk(k, -1).indices
                          for layer in range(layers)])  # layer l's choice is its gate on layer l-1's input
    trace = Trace(torch.zeros(1, positions, dtype=torch.long), hidden, chosen)
    assert gate_reuse_accuracy(trace, routers, 1) == 1.0
    assert gate_reuse_accuracy(trace, routers, 2) < 1.0
    stats = routing_stats(trace, routers, distances=(1, 2))
    assert stats.gate_reuse_accuracy[1] == 1.0 and stats.tokens == positions


def test_a_trained_copy_learns_and_keeps_the_checkpoints_format(tmp_path: Path, checkpoint: Path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "trained"
    result = train_model(checkpoint, out, None,
                         ModelTrainingConfig(minutes=10.0, max_steps=6, batch=2, corpus_tokens=8192))
    assert result["steps"] == 6
    assert result["loss_last"] < result["loss_first"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert (out / "tokenizer.json").is_file()
    original = AutoModelForCausalLM.from_pretrained(checkpoint)
    copy = AutoModelForCausalLM.from_pretrained(out)
    weights, original_weights = copy.state_dict(), original.state_dict()
    assert weights.keys() == original_weights.keys()
    assert all(weights[name].dtype == original_weights[name].dtype for name in weights)
    assert any(not torch.equal(weights[name], original_weights[name]) for name in weights)
