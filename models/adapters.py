"""One small adapter per supported architecture: which decoder layers are MoE layers, how many experts they have,
and where the router and every expert matrix are, on disk and in the transformers module tree.

The runtime's expert numbering is ``moe_layer * experts_per_layer + expert``, where ``moe_layer`` indexes the MoE
layers only (dense layers of ``mlp_only_layers`` / ``decoder_sparse_step`` / ``first_k_dense_replace`` have no
experts and get no number).

In memory (transformers 5) every adapted architecture has the same shape: decoder layer ``N`` has
``model.layers.N.mlp.gate`` (a router returning ``(logits, weights, indices)``) and ``model.layers.N.mlp.experts``
(an experts module with ``use_experts_implementation``, fused ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``). On disk the experts are per expert, under names that differ by architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

MATRICES = ("gate", "up", "down")
"""The three matrices of one expert, in the order of the host store's buffer."""


class CheckpointError(ValueError):
    """The checkpoint cannot be served; the message names the file or key."""


@dataclass(frozen=True)
class MoeAdapter:
    """How one architecture lays out its experts (on disk) and its MoE blocks (config and module tree)."""

    model_type: str
    """``config.json``'s ``model_type``."""
    n_experts_keys: tuple[str, ...]
    """config keys that may hold the routed-expert count, first present wins."""
    expert_ffn_key: str
    """config key of one routed expert's FFN width (I)."""
    block_on_disk: str
    """Name of the MoE block under ``model.layers.N.`` in the safetensors keys (``mlp`` or ``block_sparse_moe``)."""
    matrix_names: tuple[str, str, str]
    """On-disk names of (gate, up, down) of one expert: ``gate_proj.weight`` or ``w1.weight``..."""
    dense_rule: str
    """Which decoder layers are dense: ``qwen`` (mlp_only_layers + decoder_sparse_step), ``first_k``
    (first_k_dense_replace), ``none`` (every layer is MoE)."""

    @cached_property
    def _expert_re(self) -> re.Pattern[str]:
        names = "|".join(re.escape(m) for m in self.matrix_names)
        return re.compile(rf"^model\.layers\.(\d+)\.{re.escape(self.block_on_disk)}\.experts\.(\d+)\.({names})$")

    # ---------------------------------------------------------------- config
    def experts_per_layer(self, config: dict[str, Any]) -> int:
        for key in self.n_experts_keys:
            if config.get(key):
                return int(config[key])
        raise CheckpointError(f"config.json has none of {self.n_experts_keys} (the routed expert count)")

    def intermediate_size(self, config: dict[str, Any]) -> int:
        return int(config[self.expert_ffn_key])

    def moe_layers(self, config: dict[str, Any]) -> tuple[int, ...]:
        n_layers = int(config["num_hidden_layers"])
        if self.dense_rule == "qwen":
            step = int(config.get("decoder_sparse_step", 1) or 1)
            dense = set(config.get("mlp_only_layers") or [])
            return tuple(layer for layer in range(n_layers) if layer not in dense and (layer + 1) % step == 0)
        if self.dense_rule == "first_k":
            return tuple(range(int(config.get("first_k_dense_replace", 0) or 0), n_layers))
        return tuple(range(n_layers))

    # ---------------------------------------------------------------- on-disk keys
    def expert_key(self, decoder_layer: int, expert: int, matrix: str) -> str:
        name = self.matrix_names[MATRICES.index(matrix)]
        return f"model.layers.{decoder_layer}.{self.block_on_disk}.experts.{expert}.{name}"

    def router_key(self, decoder_layer: int) -> str:
        return f"model.layers.{decoder_layer}.{self.block_on_disk}.gate.weight"

    def parse_expert_key(self, key: str) -> tuple[int, int, str] | None:
        """``(decoder layer, expert, matrix)`` of a routed-expert tensor's key, None for any other key."""
        match = self._expert_re.match(key)
        if match is None:
            return None
        return int(match[1]), int(match[2]), MATRICES[self.matrix_names.index(match[3])]

    def model_key(self, disk_key: str) -> str:
        """The state-dict key of a non-expert tensor in the transformers 5 module tree."""
        if self.block_on_disk == "mlp":
            return disk_key
        return disk_key.replace(f".{self.block_on_disk}.", ".mlp.", 1)


_QWEN_MATRICES = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")

ADAPTERS: dict[str, MoeAdapter] = {
    adapter.model_type: adapter
    for adapter in (
        # shared expert + sigmoid shared_expert_gate live in the skeleton (non-expert tensors)
        MoeAdapter("qwen2_moe", ("num_experts",), "moe_intermediate_size", "mlp", _QWEN_MATRICES, "qwen"),
        # no shared expert; transformers 5 writes the count as num_local_experts, Qwen's own configs num_experts
        MoeAdapter("qwen3_moe", ("num_experts", "num_local_experts"), "moe_intermediate_size", "mlp",
                   _QWEN_MATRICES, "qwen"),
        # w1 = gate, w3 = up, w2 = down (the original Mistral naming, which save_pretrained still writes)
        MoeAdapter("mixtral", ("num_local_experts",), "intermediate_size", "block_sparse_moe",
                   ("w1.weight", "w3.weight", "w2.weight"), "none"),
        # shared experts in the skeleton; the first first_k_dense_replace layers are dense
        MoeAdapter("deepseek_v2", ("n_routed_experts", "num_experts"), "moe_intermediate_size", "mlp",
                   _QWEN_MATRICES, "first_k"),
    )
}
SUPPORTED_ARCHITECTURES = tuple(ADAPTERS)


def adapter_for(config: dict[str, Any], where: str) -> MoeAdapter:
    arch = config.get("model_type")
    if arch not in ADAPTERS:
        raise CheckpointError(
            f"{where}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return ADAPTERS[arch]
