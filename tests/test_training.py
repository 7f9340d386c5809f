"""--train-predictor: the learned predictor beats its baselines on held-out tokens, and the runtime uses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coordinator.runtime_process import PROJECT_ROOT
from tests.conftest import NEW_TOKENS, PROMPT_IDS
from training.predictor_training import LearnedPredictor, TrainingConfig, pairs, train_predictor

SMALL = TrainingConfig(tokens=8192, epochs=6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("predictor") / "predictor.safetensors"
    return out, train_predictor(checkpoint, out, None, SMALL)


def mean(rows: list[dict], key: str, distance: int) -> float:
    sel = [r[key] for r in rows if r["distance"] == distance]
    return sum(sel) / len(sel)


def test_learned_predictor_beats_gate_reuse_and_token_frequency_on_held_out_tokens(trained):
    _, rows = trained
    assert len(rows) == 6 * 3  # every (layer, distance 1..3)
    assert all(r["test_tokens"] > 500 for r in rows)
    for distance in (1, 2, 3):
        assert mean(rows, "learned", distance) > mean(rows, "gate_reuse", distance), distance
        assert mean(rows, "learned", distance) > mean(rows, "token_frequency", distance), distance


def test_cross_token_pairs_target_the_next_token():
    trace_hidden = torch.arange(2 * 1 * 3 * 1, dtype=torch.float32).view(2, 1, 3, 1)  # [L=2, W=1, S=3, H=1]
    chosen = torch.arange(2 * 1 * 3 * 1).view(2, 1, 3, 1) + 100
    from training.predictor_training import Trace

    trace = Trace(torch.zeros(1, 3, dtype=torch.long), trace_hidden, chosen)
    x, y, _ = pairs(trace, source=1, distance=1)  # layer 1 -> layer 0 of the next token
    assert x[0, :, 0].tolist() == [3.0, 4.0]
    assert y[0, :, 0].tolist() == [101, 102]
    x, y, _ = pairs(trace, source=0, distance=1)  # layer 0 -> layer 1, same token
    assert x[0, :, 0].tolist() == [0.0, 1.0, 2.0] and y[0, :, 0].tolist() == [103, 104, 105]


def test_predictor_file_round_trip(trained):
    path, _ = trained
    learned = LearnedPredictor(path, hidden_size=256, experts_per_layer=32)
    predicted = learned.predict(torch.randn(1, 256), source_layer=0, distance=2)
    assert predicted is not None and len(predicted) == 4 and all(0 <= e < 32 for e in predicted)
    assert learned.predict(torch.randn(1, 256), source_layer=0, distance=7) is None
    with pytest.raises(ValueError, match="another model"):
        LearnedPredictor(path, hidden_size=128, experts_per_layer=32)


def test_runtime_with_the_learned_predictor_is_exact_and_predicts(runtime_factory, reference, trained):
    path, _ = trained
    rt = runtime_factory("--policy", "promoe", "--cache-experts", "24", "--predictor", str(path))
    with rt.client() as client:
        done = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
    assert done.token_ids == reference["ids"]
    assert 0 < done.metrics["prefetch_precision"] <= 1
    assert "learned predictor" in rt.log()


def test_train_predictor_cli_prints_the_table(tmp_path, checkpoint):
    out = tmp_path / "p.safetensors"
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "launch.py"), "--model-path", str(checkpoint),
                           "--train-predictor", str(out), "--train-tokens", "2048"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "gate reuse" in done.stdout and "token freq" in done.stdout
    assert out.is_file()


def test_missing_predictor_file_is_a_clear_error(tmp_path, checkpoint):
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "launch.py"), "--model-path", str(checkpoint),
                           "--predictor", str(tmp_path / "nope"), "--prompt-ids", "1"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no such file" in done.stderr
