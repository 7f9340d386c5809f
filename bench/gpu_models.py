"""The two models of the GPU benchmark, at real expert size, built without writing any expert to disk.

Both are ``qwen2_moe`` models whose routed experts are synthetic (``models.synthetic_experts``): the runtime's loader
generates them into the host store, and the benchmark's reference model (plain transformers, same device) holds the
very same values. Only the non-expert weights go to disk, once per run, through the normal checkpoint path.

- ``synthetic`` routing: Qwen1.5-MoE-A2.7B's shape (24 x 60 experts, top-4); seeded routers scaled so that a token's
  logits have std ``ROUTER_LOGIT_STD`` and each expert's row by ``rank^-ROUTER_SKEW`` (a random popularity rank per
  layer), so that a quarter of the experts take most uses. The learned predictor is trained on it in the benchmark.
- ``trace`` routing: DeepSeek-V2-Lite's routed shape (26 x 64 experts, top-6, shared experts of 2 x 1408) whose
  routers choose exactly what ``deepseek-v2-lite-routing.npz`` recorded. Token id ``t`` stands for the ``t``-th
  replayed trace position; the embedding writes ``REPLAY_CODE`` at the reserved hidden dim of ``t`` (the last
  ``replay_positions`` dims are reserved); attention (``o_proj``), the shared expert and every routed expert
  (``down_proj``) write zero there, so the code reaches every layer unchanged; layer ``l``'s router reads only the
  reserved dims and has a 1 at (expert ``e``, dim of ``t``) when the trace chose ``e`` at ``l`` for ``t``: the
  chosen experts get equal positive logits, all others exactly zero (RMSNorm rescales by a positive factor, so the
  top-k is unchanged). The LM head maps the dim of ``t`` to token ``t + 1``, so greedy generation walks the trace.
  Because the code of the *current* token decides every layer's routing, skip-layer gate reuse would read the
  future exactly here: the benchmark never uses it for this model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.synthetic_experts import SyntheticExperts
from shm.layout import ExpertLayout

ROUTER_LOGIT_STD = 4.0
"""Synthetic routing: router rows scaled so that a token's logits have about this std."""
ROUTER_SKEW = 0.8
"""Synthetic routing: exponent of the per-expert router scale ``rank^-a`` (popular experts)."""
WEIGHT_STD = 0.02
"""Std of every generated weight (non-expert and expert)."""
REPLAY_CODE = 8.0
"""Trace routing: the value the embedding writes at a token's reserved dim."""


@dataclass(frozen=True)
class ModelSpec:
    """Dimensions of one benchmark model."""

    name: str
    """Directory name of its checkpoint (bump when anything that changes the weights changes)."""
    layers: int
    """Decoder layers, all MoE."""
    experts: int
    """Routed experts per layer."""
    top_k: int
    """Experts per token."""
    hidden: int
    """H."""
    inter: int
    """I of one routed expert."""
    shared: int
    """FFN width of the shared expert (and of the unused dense MLP)."""
    heads: int
    """Attention heads."""
    kv_heads: int
    """KV heads."""
    vocab: int
    """Vocabulary."""
    replay_positions: int = 0
    """Trace routing: hidden dims reserved for the position code (= most trace positions one run replays)."""
    seed: int = 0
    """Seed of every weight."""

    @property
    def n_experts(self) -> int:
        return self.layers * self.experts

    @property
    def expert_nbytes(self) -> int:
        return 3 * self.hidden * self.inter * 2  # bf16

    def layout(self, n_slots: int, compute_dtype: str) -> ExpertLayout:
        return ExpertLayout(moe_layers=tuple(range(self.layers)), experts_per_layer=self.experts, top_k=self.top_k,
                            hidden_size=self.hidden, intermediate_size=self.inter, storage_dtype="bfloat16",
                            compute_dtype=compute_dtype, n_chunks=3, n_slots=n_slots)

    def synthetic_experts(self) -> SyntheticExperts:
        reserved = (self.hidden - self.replay_positions, self.hidden) if self.replay_positions else (0, 0)
        return SyntheticExperts(seed=self.seed + 101, std=WEIGHT_STD, dtype="bfloat16", zero_down_rows=reserved)


QWEN = ModelSpec("qwen15-moe-a27b-synthetic-v2", layers=24, experts=60, top_k=4, hidden=2048, inter=1408,
                 shared=5632, heads=16, kv_heads=16, vocab=151936)
DEEPSEEK_REPLAY = ModelSpec("deepseek-v2-lite-replay-v1", layers=26, experts=64, top_k=6, hidden=2048, inter=1408,
                            shared=2816, heads=16, kv_heads=16, vocab=102400, replay_positions=512)
QWEN_TINY = ModelSpec("qwen-tiny-synthetic-v2", layers=4, experts=16, top_k=4, hidden=64, inter=32, shared=64,
                      heads=4, kv_heads=2, vocab=320)
DEEPSEEK_TINY = ModelSpec("deepseek-tiny-replay-v1", layers=3, experts=64, top_k=6, hidden=96, inter=32, shared=64,
                          heads=4, kv_heads=2, vocab=128, replay_positions=48)


def model_config(spec: ModelSpec) -> Any:
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.shared,
        moe_intermediate_size=spec.inter, shared_expert_intermediate_size=spec.shared,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        num_experts=spec.experts, num_experts_per_tok=spec.top_k, norm_topk_prob=False, max_position_embeddings=4096,
        rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, tie_word_embeddings=False, eos_token_id=None,
        bos_token_id=None, pad_token_id=None)


def build_model(spec: ModelSpec, device: torch.device) -> Any:
    """The bf16 model with seeded non-expert weights generated on ``device`` and the synthetic experts; routers and
    the replay construction are set afterwards (``set_synthetic_routers`` / ``make_replay``)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(spec), dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    model.set_experts_implementation("eager")
    gen = torch.Generator(device).manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".mlp.experts." in name:
                continue
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, WEIGHT_STD, generator=gen)
        set_experts(model, spec, device)
    return model


def set_experts(model: Any, spec: ModelSpec, device: torch.device) -> None:
    """Every routed expert from the synthetic pool: exactly the values the runtime's loader generates."""
    synthetic = spec.synthetic_experts()
    layout = spec.layout(n_slots=spec.n_experts, compute_dtype="bfloat16")
    pool = synthetic.pool(layout.expert_numel).to(device)
    gate_up = 2 * spec.inter * spec.hidden
    for layer in range(spec.layers):
        experts = model.model.layers[layer].mlp.experts
        for e in range(spec.experts):
            flat = synthetic.expert(pool, layout, layer * spec.experts + e)  # [3*I*H]
            experts.gate_up_proj[e].copy_(flat[:gate_up].view(2 * spec.inter, spec.hidden))
            experts.down_proj[e].copy_(flat[gate_up:].view(spec.hidden, spec.inter))


def set_synthetic_routers(model: Any, spec: ModelSpec) -> None:
    with torch.no_grad():
        for layer in range(spec.layers):
            gate = model.model.layers[layer].mlp.gate.weight  # [E, H]
            gen = torch.Generator(gate.device).manual_seed(spec.seed * 1000 + 17 + layer)
            rank = torch.randperm(spec.experts, generator=gen, device=gate.device).float() + 1
            rows = torch.randn(gate.shape, generator=gen, device=gate.device)
            scale = ROUTER_LOGIT_STD / spec.hidden ** 0.5 * rank.pow(-ROUTER_SKEW)
            gate.copy_(rows * scale[:, None])


def make_replay(model: Any, spec: ModelSpec, chosen: np.ndarray) -> None:
    """The trace construction (module docstring): ``chosen[t, l]`` are the experts of replayed position ``t`` (token
    id ``t``) at layer ``l``, ``[T, L, k]`` with ``T <= replay_positions``."""
    n_pos, reserved = chosen.shape[0], spec.hidden - spec.replay_positions
    if n_pos > spec.replay_positions or chosen.shape[1] < spec.layers:
        raise ValueError(f"{n_pos} positions x {chosen.shape[1]} layers do not fit {spec.name}")
    with torch.no_grad():
        embed = model.model.embed_tokens.weight  # [V, H]
        positions = torch.arange(n_pos, device=embed.device)
        embed[:, reserved:] = 0
        embed[positions, reserved + positions] = REPLAY_CODE
        for layer in range(spec.layers):
            block = model.model.layers[layer]
            block.self_attn.o_proj.weight[reserved:] = 0  # [H, H]: attention writes nothing into the code
            block.mlp.shared_expert.down_proj.weight[reserved:] = 0  # [H, shared]
            router = torch.zeros(spec.experts, spec.hidden)  # [E, H]
            rows = torch.from_numpy(chosen[:, layer].astype(np.int64))  # [T, k]
            router[rows.flatten(), reserved + torch.arange(n_pos).repeat_interleave(rows.shape[1])] = 1.0
            block.mlp.gate.weight.copy_(router)
        head = model.lm_head.weight  # [V, H]
        head.zero_()
        head[positions + 1, reserved + positions] = 1.0  # position t -> token t + 1


def write_checkpoint(model: Any, spec: ModelSpec, out: Path) -> Path:
    """config.json, every non-expert tensor (one safetensors file) and the synthetic experts' description."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".mlp.experts." not in k}
    save_file(state, str(out / "model.safetensors"))
    model.config.save_pretrained(out)
    spec.synthetic_experts().write(out)
    (out / "bench-spec.json").write_text(json.dumps(asdict(spec)))
    return out


def float32_copy(model: Any) -> Any:
    """CPU reference: the bf16 weights in float32, which is what the CPU runtime computes with."""
    import copy

    return copy.deepcopy(model).float()
