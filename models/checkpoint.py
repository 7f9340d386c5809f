"""A checkpoint on disk: where it is, what its experts look like, and reading it tensor by tensor.

Only ``qwen2_moe`` is supported for now. Experts are read expert by expert straight from the memory-mapped
safetensors files into the host store; the other tensors go to the inference worker. Nothing materialises the
whole model in memory.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from shm.layout import ExpertLayout

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("qwen2_moe",)
MATRICES = ("gate", "up", "down")
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


class CheckpointError(ValueError):
    """The checkpoint cannot be served; the message names the file or key."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    """Directory with config.json and *.safetensors."""
    config: dict
    """Parsed config.json."""
    files: tuple[Path, ...]
    """The safetensors files, in index order."""

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / "tokenizer.json").is_file() or (self.path / "tokenizer_config.json").is_file()

    def moe_layers(self) -> tuple[int, ...]:
        cfg = self.config
        sparse_step = int(cfg.get("decoder_sparse_step", 1) or 1)
        dense = set(cfg.get("mlp_only_layers", []) or [])
        return tuple(
            layer
            for layer in range(int(cfg["num_hidden_layers"]))
            if layer not in dense and cfg.get("num_experts", 0) > 0 and (layer + 1) % sparse_step == 0
        )

    def storage_dtype(self) -> str:
        """dtype of the first expert tensor, read from the safetensors header."""
        layer = self.moe_layers()[0]
        key = f"model.layers.{layer}.mlp.experts.0.gate_proj.weight"
        for file in self.files:
            header = read_safetensors_header(file)
            if key in header:
                name = header[key]["dtype"]
                if name not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file}: expert dtype {name} is not supported")
                return _SAFETENSORS_DTYPES[name]
        raise CheckpointError(f"{self.path}: no file holds {key}")

    def layout(self, n_slots: int, n_chunks: int, compute_dtype: str) -> ExpertLayout:
        cfg = self.config
        return ExpertLayout(
            moe_layers=self.moe_layers(),
            experts_per_layer=int(cfg["num_experts"]),
            top_k=int(cfg["num_experts_per_tok"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["moe_intermediate_size"]),
            storage_dtype=self.storage_dtype(),
            compute_dtype=compute_dtype,
            n_chunks=n_chunks,
            n_slots=n_slots,
        )


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    config = json.loads(config_file.read_text())
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{config_file}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = tuple(dict.fromkeys(path / name for name in weight_map.values()))
    else:
        files = tuple(sorted(path.glob("*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: shard named by the index is missing")
    return Checkpoint(path=path, config=config, files=files)


def read_safetensors_header(file: Path) -> dict:
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{file}: truncated (no safetensors header)")
        (size,) = struct.unpack("<Q", raw)
        body = fh.read(size)
        if len(body) != size:
            raise CheckpointError(f"{file}: truncated safetensors header")
    header = json.loads(body)
    header.pop("__metadata__", None)
    return header


def expert_key(decoder_layer: int, expert: int, matrix: str) -> str:
    return f"model.layers.{decoder_layer}.mlp.experts.{expert}.{matrix}_proj.weight"


def iter_expert_tensors(ckpt: Checkpoint, layout: ExpertLayout) -> Iterator[tuple[int, int, str, torch.Tensor]]:
    """Yield ``(moe_layer, expert, matrix, tensor)`` for every expert matrix, file by file, memory-mapped."""
    moe_index = {layer: i for i, layer in enumerate(layout.moe_layers)}
    seen = set()
    for file in ckpt.files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                match = _EXPERT_KEY.match(key)
                if match is None:
                    continue
                layer, expert, matrix = int(match[1]), int(match[2]), match[3]
                if layer not in moe_index or expert >= layout.experts_per_layer:
                    raise CheckpointError(f"{file}: unexpected expert tensor {key}")
                seen.add((layer, expert, matrix))
                yield moe_index[layer], expert, matrix, fh.get_tensor(key)
    for layer in layout.moe_layers:
        for expert in range(layout.experts_per_layer):
            for matrix in MATRICES:
                if (layer, expert, matrix) not in seen:
                    raise CheckpointError(f"{ckpt.path}: missing tensor {expert_key(layer, expert, matrix)}")


def load_router_weights(ckpt: Checkpoint, layout: ExpertLayout) -> torch.Tensor:
    """The gate (router) weight of every MoE layer, float32: ``[n_moe_layers, E, H]``."""
    keys = {f"model.layers.{layer}.mlp.gate.weight": i for i, layer in enumerate(layout.moe_layers)}
    routers = torch.empty(len(keys), layout.experts_per_layer, layout.hidden_size)
    found = set()
    for file in ckpt.files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                if key in keys:
                    routers[keys[key]].copy_(fh.get_tensor(key))
                    found.add(key)
    missing = sorted(set(keys) - found)
    if missing:
        raise CheckpointError(f"{ckpt.path}: missing router tensor {missing[0]}")
    return routers


def load_non_expert_state(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor that is not a routed expert, cast to ``dtype`` (the compute dtype)."""
    state = {}
    for file in ckpt.files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                if not _EXPERT_KEY.match(key):
                    state[key] = fh.get_tensor(key).to(dtype)
    return state
