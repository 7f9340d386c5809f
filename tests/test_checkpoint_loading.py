"""Reading checkpoints: experts streamed into the host store exactly as stored, with progress; bad checkpoints
refused by ``launch.py`` with the file or key named, before any worker starts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from coordinator.runtime_process import PROJECT_ROOT
from models.checkpoint import CheckpointError, open_checkpoint
from models.streaming import FillProgress, fill_store
from shm.expert_store import HostExpertStore
from shm.segment import Segment


def fill(path: Path, tmp_path: Path) -> tuple[HostExpertStore, object]:
    ckpt = open_checkpoint(path)
    layout = ckpt.layout(n_slots=2, n_chunks=3, compute_dtype="float32")
    segment = Segment.create(f"promoe_test{os.getpid()}_{tmp_path.name[-8:]}_store",
                             HostExpertStore.nbytes_for(layout))
    store = HostExpertStore(segment, layout)
    try:
        fill_store(ckpt, layout, store, interval_s=0.0)
    except BaseException:
        store.close()
        segment.unlink()
        raise
    return store, ckpt


def release(store: HostExpertStore) -> None:
    segment = store.segment
    store.close()
    segment.unlink()


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_store_holds_every_expert_exactly_as_on_disk(tmp_path, tiny_checkpoints, arch, caplog):
    caplog.set_level(logging.INFO, logger="models.streaming")
    store, ckpt = fill(tiny_checkpoints[arch], tmp_path)
    try:
        lay = store.layout
        for moe_layer, layer in enumerate(lay.moe_layers):
            for expert in range(lay.experts_per_layer):
                for matrix in ("gate", "up", "down"):
                    key = ckpt.adapter.expert_key(layer, expert, matrix)
                    with safe_open(str(ckpt.locate(key).file), framework="pt") as fh:
                        expected = fh.get_tensor(key).reshape(-1)
                    got = store.matrix(lay.expert_id(moe_layer, expert), matrix)
                    assert torch.equal(got, expected), key
    finally:
        release(store)
    assert "host store [" in caplog.text and "GB/s" in caplog.text


def test_an_expert_in_another_dtype_is_converted(tmp_path, tiny_checkpoints):
    path = tmp_path / "mixed"
    shutil.copytree(tiny_checkpoints["qwen3_moe"], path)
    ckpt = open_checkpoint(path)
    key = ckpt.adapter.expert_key(ckpt.moe_layers()[-1], 3, "down")
    shard = ckpt.locate(key).file
    tensors = load_file(str(shard))
    original = tensors[key].clone()
    tensors[key] = tensors[key].float()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    store, _ = fill(path, tmp_path)
    try:
        expert = store.layout.expert_id(len(store.layout.moe_layers) - 1, 3)
        assert torch.equal(store.matrix(expert, "down"), original.reshape(-1))
    finally:
        release(store)


def test_progress_reports_bytes_and_rate():
    now = [0.0]
    progress = FillProgress(total_nbytes=4_000_000_000, interval_s=1.0, clock=lambda: now[0])
    now[0] = 0.5
    progress.advance(1_000_000_000)
    assert progress.reports == 0
    now[0] = 2.0
    progress.advance(1_000_000_000)
    assert progress.reports == 1
    line = progress.line(2.0)
    assert "2.00/4.00 GB (50%) at 1.00 GB/s" in line and "~2 s left" in line


def test_a_file_shortened_after_validation_fails_the_fill_naming_it(tmp_path, tiny_checkpoints):
    path = tmp_path / "short"
    shutil.copytree(tiny_checkpoints["qwen2_moe"], path)
    ckpt = open_checkpoint(path)
    layout = ckpt.layout(n_slots=2, n_chunks=3, compute_dtype="float32")
    shard = ckpt.locate(ckpt.adapter.expert_key(ckpt.moe_layers()[-1], 7, "up")).file
    os.truncate(shard, 100)
    segment = Segment.create(f"promoe_test{os.getpid()}_short_store", HostExpertStore.nbytes_for(layout))
    store = HostExpertStore(segment, layout)
    try:
        with pytest.raises(CheckpointError, match=f"{shard}: truncated"):
            fill_store(ckpt, layout, store)
    finally:
        store.close()
        segment.unlink()


# ---------------------------------------------------------------- bad checkpoints, as launch.py sees them
def broken_copy(tmp_path: Path, source: Path) -> Path:
    path = tmp_path / "broken"
    shutil.copytree(source, path)
    return path


def launch_refuses(path: Path, tmp_path: Path) -> str:
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "launch.py"), "--model-path", str(path), "--run-root",
                           str(tmp_path), "--prompt-ids", "1", "--max-new-tokens", "1"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "shared memory store" not in done.stderr, "workers were started for a bad checkpoint"
    assert not list(tmp_path.glob("promoe-run-*/runtime.json"))
    return done.stderr


def test_missing_shard(tmp_path, tiny_checkpoints):
    path = broken_copy(tmp_path, tiny_checkpoints["qwen2_moe"])
    shard = sorted(path.glob("model-*.safetensors"))[2]
    shard.unlink()
    err = launch_refuses(path, tmp_path)
    assert f"cannot serve this checkpoint: {shard}: shard named by model.safetensors.index.json is missing" in err


def test_truncated_shard(tmp_path, tiny_checkpoints):
    path = broken_copy(tmp_path, tiny_checkpoints["mixtral"])
    shard = sorted(path.glob("model-*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 10)
    err = launch_refuses(path, tmp_path)
    assert f"{shard}: truncated:" in err


def test_unsupported_architecture(tmp_path, tiny_checkpoints):
    path = broken_copy(tmp_path, tiny_checkpoints["qwen3_moe"])
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_oss"}))
    err = launch_refuses(path, tmp_path)
    assert f"{path / 'config.json'}: architecture 'gpt_oss' is not supported (supported: qwen2_moe, qwen3_moe, " \
           "mixtral, deepseek_v2)" in err


def test_one_expert_key_missing(tmp_path, tiny_checkpoints):
    path = broken_copy(tmp_path, tiny_checkpoints["deepseek_v2"])
    ckpt = open_checkpoint(path)
    key = ckpt.adapter.expert_key(ckpt.moe_layers()[-1], 5, "up")
    shard = ckpt.locate(key).file
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    err = launch_refuses(path, tmp_path)
    assert f"{path}: missing tensor {key}" in err


def test_index_naming_a_key_its_shard_lacks(tmp_path, tiny_checkpoints):
    path = broken_copy(tmp_path, tiny_checkpoints["qwen2_moe"])
    ckpt = open_checkpoint(path)
    key = ckpt.adapter.router_key(ckpt.moe_layers()[0])
    shard = ckpt.locate(key).file
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{shard}: does not hold {key}"):
        open_checkpoint(path)
