"""``--model NAME`` resolution in a fake Hugging Face cache (``models--ORG--NAME/snapshots/REV/``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.runtime_process import PROJECT_ROOT
from models.registry import MODEL_NAMES, ModelNotFound, find_checkpoint, hub_cache_dir, resolve_model


def fake_snapshot(cache: Path, repo: str, revision: str = "abc123", main: bool = True) -> Path:
    repo_path = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_path / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen2_moe"}))
    if main:
        (repo_path / "refs").mkdir(exist_ok=True)
        (repo_path / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_cache_directory_follows_the_environment(clean_env, tmp_path):
    assert hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    clean_env.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_cache_dir() == tmp_path / "hub"


def test_chat_is_preferred_over_base(clean_env, tmp_path):
    clean_env.setenv("HF_HOME", str(tmp_path / "hf"))
    cache = tmp_path / "hf" / "hub"
    base = fake_snapshot(cache, "Qwen/Qwen1.5-MoE-A2.7B")
    assert find_checkpoint("qwen-moe") == base
    chat = fake_snapshot(cache, "Qwen/Qwen1.5-MoE-A2.7B-Chat")
    assert find_checkpoint("qwen-moe") == chat


def test_refs_main_picks_the_revision_else_the_newest_snapshot(clean_env, tmp_path):
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cache = tmp_path / "hub"
    old = fake_snapshot(cache, "mistralai/Mixtral-8x7B-Instruct-v0.1", "old")
    new = fake_snapshot(cache, "mistralai/Mixtral-8x7B-Instruct-v0.1", "new", main=False)
    assert find_checkpoint("mixtral") == old  # refs/main says "old"
    (cache / "models--mistralai--Mixtral-8x7B-Instruct-v0.1" / "refs" / "main").unlink()
    os.utime(old / "config.json")
    os.utime(new, (1e9, 2e9))
    os.utime(old, (1e9, 1e9))
    assert find_checkpoint("mixtral") == new


def test_a_snapshot_without_config_is_not_a_checkpoint(clean_env, tmp_path):
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub" / "models--Qwen--Qwen3-30B-A3B" / "snapshots" / "r1").mkdir(parents=True)
    assert find_checkpoint("qwen3-moe") is None


def test_nothing_found_qwen_moe_falls_back_and_others_fail_listing_the_places(clean_env, tmp_path, caplog):
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    default = tmp_path / "default"
    assert resolve_model("qwen-moe", default=lambda: default) == default
    assert "models--Qwen--Qwen1.5-MoE-A2.7B-Chat" in caplog.text and "embedded default" in caplog.text
    with pytest.raises(ModelNotFound) as info:
        resolve_model("qwen2-moe", default=lambda: default)
    message = str(info.value)
    for repo in MODEL_NAMES["qwen2-moe"].repos:
        assert str(tmp_path / "hub" / ("models--" + repo.replace("/", "--"))) in message


def test_launch_resolves_qwen_moe_from_a_fake_cache(tmp_path, tiny_checkpoints):
    """``launch.py --model qwen-moe`` takes the checkpoint it finds in the cache (here the tiny qwen2_moe, 2 MoE
    layers x 8 experts): an out-of-range cache size makes it say which model it opened, and stop before starting
    workers (the runtime itself is exercised on the same checkpoints in test_architectures)."""
    snapshot = tmp_path / "hf" / "hub" / "models--Qwen--Qwen1.5-MoE-A2.7B-Chat" / "snapshots" / "r1"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(tiny_checkpoints["qwen2_moe"], target_is_directory=True)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PROMOE_CACHE": str(tmp_path / "promoe-cache")}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "launch.py"), "--model", "qwen-moe", "--run-root",
                           str(tmp_path), "--cache-experts", "17", "--prompt-ids", "1"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"using Qwen/Qwen1.5-MoE-A2.7B-Chat from {snapshot}" in done.stderr
    assert "outside 2 (one layer's top-k) .. 16 (all experts)" in done.stderr  # the tiny checkpoint's geometry
    assert not (tmp_path / "promoe-cache").exists(), "the embedded default must not be generated"


def test_launch_unknown_cache_entry_for_mixtral_fails_clearly(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty")}
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "launch.py"), "--model", "mixtral", "--prompt-ids",
                           "1"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--model mixtral: no checkpoint found" in done.stderr
    assert "models--mistralai--Mixtral-8x7B-Instruct-v0.1" in done.stderr
