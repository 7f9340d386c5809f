"""The embedded default model: a small seeded ``qwen2_moe`` checkpoint written once in the real on-disk format.

No weights are ever downloaded. ``--model qwen-moe`` without a real checkpoint generates this one into the cache
directory (``$PROMOE_CACHE`` or ``~/.cache/promoe``) with ``save_pretrained``, keys
``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` included, plus a byte-level tokenizer whose token id
is the byte value, and then loads it through the same path as any other checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class DefaultModelSpec:
    """Dimensions of the generated checkpoint (bump ``name`` when they change)."""

    name: str = "qwen-moe-tiny-v1"
    """Directory name under the cache; a new name forces regeneration."""
    num_hidden_layers: int = 6
    """Decoder layers, all MoE."""
    num_experts: int = 32
    """Routed experts per layer."""
    num_experts_per_tok: int = 4
    """top_k."""
    hidden_size: int = 256
    """H."""
    moe_intermediate_size: int = 256
    """I of one routed expert."""
    shared_expert_intermediate_size: int = 512
    """FFN width of the always-on shared expert."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """KV heads."""
    vocab_size: int = 257
    """256 byte tokens and the end-of-text token: every id decodes."""
    initializer_range: float = 0.08
    """Raised from transformers' 0.02 so that routing and greedy output vary from token to token."""
    dtype: str = "bfloat16"
    """On-disk dtype, as real Qwen checkpoints."""
    seed: int = 1234
    """Seed of the weights."""


def cache_root() -> Path:
    return Path(os.environ.get("PROMOE_CACHE", Path.home() / ".cache" / "promoe"))


def ensure_default_checkpoint(spec: DefaultModelSpec | None = None, root: Path | None = None) -> Path:
    """Return the directory of the default checkpoint, generating it first if it is not there yet."""
    spec = spec or DefaultModelSpec()
    target = (root or cache_root()) / spec.name
    if (target / "config.json").is_file():
        return target
    log.warning("no real checkpoint given: generating the embedded default %s into %s (once)", spec.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        write_checkpoint(spec, staging)
        try:
            staging.rename(target)  # atomic: concurrent generators race harmlessly
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_checkpoint(spec: DefaultModelSpec, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        moe_intermediate_size=spec.moe_intermediate_size,
        shared_expert_intermediate_size=spec.shared_expert_intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        norm_topk_prob=False,
        max_position_embeddings=4096,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=False,
        eos_token_id=256,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.to(getattr(torch, spec.dtype))
    model.generation_config.eos_token_id = None  # a random model should not stop on a random end-of-text
    model.save_pretrained(out)
    write_byte_tokenizer(out)


def write_byte_tokenizer(out: Path) -> None:
    """A byte-level tokenizer whose ids 0..255 are the byte values and 256 is end-of-text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab[EOS_TOKEN] = 256
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN)
    fast.save_pretrained(out)
