"""``launch.py`` as a user runs it: one-shot mode, --json, --connect, cache-size errors, --profile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.runtime_process import PROJECT_ROOT
from shm.segment import leftover_segments
from tests.conftest import NEW_TOKENS, PROMPT_IDS, PROMPT_TEXT

JSON_FIELDS = {"token_ids", "text", "ttft_ms", "tpot_ms", "hit_rate", "stall_ms", "experts_loaded", "bytes_loaded",
               "prefetch_precision", "prefetch_recall", "goodpred"}


def launch(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    device = () if "--device" in args else ("--device", "cpu")  # the CPU oracle, also on a GPU machine
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "launch.py"), *device, *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


def test_one_shot_json(tmp_path, checkpoint, reference):
    ids = ",".join(map(str, PROMPT_IDS))
    done = launch("--model-path", str(checkpoint), "--run-root", str(tmp_path), "--policy", "lru",
                  "--cache-experts", "24", "--prompt-ids", ids, "--max-new-tokens", str(NEW_TOKENS), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert set(out) >= JSON_FIELDS
    assert out["token_ids"] == reference["ids"]
    assert isinstance(out["text"], str)
    assert out["experts_loaded"] > 0 and out["bytes_loaded"] == out["experts_loaded"] * 3 * 256 * 256 * 2
    run_id = re.search(r"run (\w+): shared memory", done.stderr)[1]
    assert leftover_segments(run_id) == []
    assert not list(tmp_path.glob("promoe-run-*"))


def test_one_shot_text_prints_the_text_and_a_summary(tmp_path, checkpoint, reference):
    from transformers import AutoTokenizer

    done = launch("--model-path", str(checkpoint), "--run-root", str(tmp_path), "--prompt", PROMPT_TEXT,
                  "--max-new-tokens", str(NEW_TOKENS))
    assert done.returncode == 0, done.stderr
    expected = AutoTokenizer.from_pretrained(checkpoint).decode(reference["text"])
    assert done.stdout == expected + "\n"
    assert "TPOT" in done.stderr and "hit rate" in done.stderr


@pytest.mark.parametrize("cache", ["2", "193"])
def test_cache_size_outside_bounds_is_a_clear_error(tmp_path, checkpoint, cache):
    done = launch("--model-path", str(checkpoint), "--run-root", str(tmp_path), "--cache-experts", cache,
                  "--prompt-ids", "1", timeout_s=120)
    assert done.returncode != 0
    assert "outside 4 (one layer's top-k) .. 192 (all experts)" in done.stderr


def test_unsupported_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    done = launch("--model-path", str(tmp_path), "--prompt-ids", "1", timeout_s=120)
    assert done.returncode != 0
    assert "architecture 'llama' is not supported" in done.stderr


def test_connect_sends_to_a_running_runtime(shared_runtime, reference):
    ids = ",".join(map(str, PROMPT_IDS))
    done = launch("--connect", shared_runtime.address, "--prompt-ids", ids, "--max-new-tokens", str(NEW_TOKENS),
                  "--json", timeout_s=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == reference["ids"]


@pytest.mark.skipif(shutil.which("py-spy") is None, reason="py-spy (the profile extra) is not installed")
def test_profile_leaves_one_profile_per_role(tmp_path, checkpoint):
    profiles = tmp_path / "profiles"
    done = launch("--model-path", str(checkpoint), "--run-root", str(tmp_path), "--prompt-ids", "1,2,3",
                  "--max-new-tokens", "4", "--profile", str(profiles))
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in profiles.iterdir())
    assert names == [f"{r}.speedscope.json" for r in ("coordinator", "inference", "loader", "predictor")]
    for path in profiles.iterdir():
        profile = json.loads(path.read_text())
        assert profile["profiles"], f"{path.name} holds no samples"


def test_default_model_is_generated_once_and_announced(tmp_path):
    env_cache = tmp_path / "cache"
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO);"
            "from pathlib import Path; from models.default_model import ensure_default_checkpoint as e;"
            f"p = e(root=Path({str(env_cache)!r})); q = e(root=Path({str(env_cache)!r})); print(p == q, p)")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True")
    assert done.stderr.count("generating the embedded default") == 1
    path = Path(done.stdout.split()[1])
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
