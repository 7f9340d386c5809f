"""A checkpoint on disk: where it is, what its experts look like, where each tensor lies, and checking all of it
before any worker starts.

Supported architectures are those of ``models.adapters``. Opening a checkpoint reads config.json and the
safetensors headers only (a few KB per shard): the tensors are read later, tensor by tensor, by whoever needs them
(``models.streaming`` for the experts, ``load_non_expert_state`` for the inference worker, ``load_router_weights``
for the predictor). Nothing materialises the whole model in memory.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from models.adapters import MATRICES, SUPPORTED_ARCHITECTURES, CheckpointError, MoeAdapter, adapter_for
from models.synthetic_experts import SyntheticExperts
from shm.layout import ExpertLayout

__all__ = ["MATRICES", "SUPPORTED_ARCHITECTURES", "Checkpoint", "CheckpointError", "TensorLocation",
           "load_non_expert_state", "load_router_weights", "open_checkpoint", "read_safetensors_header"]

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
EXPERT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "int8": "int8", "int4": "int4"}
"""``--expert-dtype``: how the routed experts are stored (int8/int4: quantized, ``shm.quantized``)."""
MAX_HEADER_NBYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    """The shard."""
    dtype: str
    """safetensors dtype name (``BF16``...)."""
    shape: tuple[int, ...]
    """Shape as stored."""
    begin: int
    """Absolute byte offset of the first byte in the file."""
    end: int
    """Absolute byte offset one past the last byte."""

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    """Directory with config.json and *.safetensors."""
    config: dict
    """Parsed config.json."""
    files: tuple[Path, ...]
    """The safetensors files, in index order."""
    adapter: MoeAdapter
    """How this architecture names its experts and router."""
    tensors: dict[str, TensorLocation] = field(repr=False)
    """Every tensor of every shard, from the headers."""
    synthetic: SyntheticExperts | None = None
    """Set for a checkpoint whose routed experts are generated, not stored (``models.synthetic_experts``)."""

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / "tokenizer.json").is_file() or (self.path / "tokenizer_config.json").is_file()

    def moe_layers(self) -> tuple[int, ...]:
        return self.adapter.moe_layers(self.config)

    def locate(self, key: str) -> TensorLocation:
        if key not in self.tensors:
            raise CheckpointError(f"{self.path}: missing tensor {key} (in none of {len(self.files)} safetensors files)")
        return self.tensors[key]

    def storage_dtype(self) -> str:
        """dtype of the experts (that of the first expert tensor)."""
        layers = self.moe_layers()
        if not layers:
            raise CheckpointError(f"{self.path / 'config.json'}: no MoE layer")
        if self.synthetic is not None:
            return self.synthetic.dtype
        loc = self.locate(self.adapter.expert_key(layers[0], 0, "gate"))
        if loc.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{loc.file}: expert dtype {loc.dtype} is not supported")
        return SAFETENSORS_DTYPES[loc.dtype]

    def layout(self, n_slots: int, n_chunks: int, compute_dtype: str, expert_dtype: str | None = None,
               group_size: int = 64) -> ExpertLayout:
        """The experts' layout; ``expert_dtype`` (``EXPERT_DTYPES``): store them converted or quantized (``group_size``
        weights per scale) instead of in the checkpoint's dtype."""
        cfg = self.config
        return ExpertLayout(
            moe_layers=self.moe_layers(),
            experts_per_layer=self.adapter.experts_per_layer(cfg),
            top_k=int(cfg["num_experts_per_tok"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=self.adapter.intermediate_size(cfg),
            storage_dtype=self.storage_dtype() if expert_dtype is None else EXPERT_DTYPES[expert_dtype],
            compute_dtype=compute_dtype,
            n_chunks=n_chunks,
            n_slots=n_slots,
            group_size=group_size,
        )

    def expert_locations(self, layout: ExpertLayout) -> list[tuple[int, str, TensorLocation]]:
        """``(expert id, matrix, location)`` of every routed-expert matrix, checked for shape."""
        hidden, ffn = layout.hidden_size, layout.intermediate_size
        out = []
        for moe_layer, layer in enumerate(layout.moe_layers):
            for expert in range(layout.experts_per_layer):
                for matrix in MATRICES:
                    key = self.adapter.expert_key(layer, expert, matrix)
                    loc = self.locate(key)
                    expected = (hidden, ffn) if matrix == "down" else (ffn, hidden)
                    if loc.shape != expected:
                        raise CheckpointError(f"{loc.file}: {key} has shape {list(loc.shape)}, expected "
                                              f"{list(expected)}")
                    if loc.dtype not in SAFETENSORS_DTYPES:
                        raise CheckpointError(f"{loc.file}: {key} has dtype {loc.dtype}, not one of "
                                              f"{sorted(SAFETENSORS_DTYPES)}")
                    out.append((int(layout.expert_id(moe_layer, expert)), matrix, loc))
        return out

    def validate(self, layout: ExpertLayout) -> None:
        """Everything the workers will read is there, whole and of the right shape (headers only: fast)."""
        if self.synthetic is None:
            self.expert_locations(layout)
        for layer in layout.moe_layers:
            key = self.adapter.router_key(layer)
            loc = self.locate(key)
            if loc.shape != (layout.experts_per_layer, layout.hidden_size):
                raise CheckpointError(f"{loc.file}: {key} has shape {list(loc.shape)}, expected "
                                      f"{[layout.experts_per_layer, layout.hidden_size]}")
        for key, loc in self.tensors.items():
            layer_expert = self.adapter.parse_expert_key(key)
            if layer_expert is not None and (layer_expert[0] not in layout.moe_layers
                                             or layer_expert[1] >= layout.experts_per_layer):
                raise CheckpointError(f"{loc.file}: unexpected expert tensor {key} (not a routed expert of "
                                      f"this config)")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read config.json and every shard's header; raise ``CheckpointError`` naming the file for anything amiss."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    adapter = adapter_for(config, str(config_file))
    index = path / "model.safetensors.index.json"
    weight_map: dict[str, str] = {}
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = tuple(dict.fromkeys(path / name for name in weight_map.values()))
    else:
        files = tuple(sorted(path.glob("*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    tensors: dict[str, TensorLocation] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: shard named by {index.name} is missing")
        tensors.update(_locations(file))
    for key, name in weight_map.items():
        if key not in tensors or tensors[key].file != path / name:
            raise CheckpointError(f"{path / name}: does not hold {key}, which {index.name} says it does")
    try:
        synthetic = SyntheticExperts.read(path)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: bad synthetic experts description: {exc}") from None
    return Checkpoint(path=path, config=config, files=files, adapter=adapter, tensors=tensors, synthetic=synthetic)


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """The header (``__metadata__`` dropped) and the offset where the data begins."""
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{file}: truncated (no safetensors header)")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER_NBYTES:
            raise CheckpointError(f"{file}: not a safetensors file (header length {size})")
        body = fh.read(size)
        if len(body) != size:
            raise CheckpointError(f"{file}: truncated safetensors header")
    try:
        header = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def _locations(file: Path) -> dict[str, TensorLocation]:
    header, data_start = read_safetensors_header(file)
    file_nbytes = os.stat(file).st_size
    out = {}
    for key, entry in header.items():
        begin, end = (data_start + int(o) for o in entry["data_offsets"])
        if end > file_nbytes:
            raise CheckpointError(f"{file}: truncated: {key} ends at byte {end}, the file has {file_nbytes}")
        out[key] = TensorLocation(file=file, dtype=entry["dtype"], shape=tuple(entry["shape"]), begin=begin, end=end)
    return out


def load_router_weights(ckpt: Checkpoint, layout: ExpertLayout) -> torch.Tensor:
    """The gate (router) weight of every MoE layer, float32: ``[n_moe_layers, E, H]``."""
    routers = torch.empty(len(layout.moe_layers), layout.experts_per_layer, layout.hidden_size)
    for i, layer in enumerate(layout.moe_layers):
        loc = ckpt.locate(ckpt.adapter.router_key(layer))
        with safe_open(str(loc.file), framework="pt") as fh:
            routers[i].copy_(fh.get_tensor(ckpt.adapter.router_key(layer)))
    return routers


def load_non_expert_state(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor that is not a routed expert, under its transformers 5 name, cast to ``dtype``."""
    state = {}
    for file in ckpt.files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if ckpt.adapter.parse_expert_key(key) is None:
                    state[ckpt.adapter.model_key(key)] = fh.get_tensor(key).to(dtype)
    return state
