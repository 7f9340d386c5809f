"""Train a copy of a checkpoint on the built-in corpus for a few minutes, so that its routing is learned routing.

A seeded random model routes by accident: which experts a token reaches says nothing about the token. Users run
trained models, whose gates specialise; predictors and caches must be judged on those too (DESIGN.md section 4).
This trains every weight with the language-modelling loss plus the checkpoint's own router load-balancing loss
(``output_router_logits``), then writes the copy with ``save_pretrained`` in the checkpoint's dtype, tokenizer
files included, so it loads through the same path as any other checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from training.predictor_training import corpus_ids

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class ModelTrainingConfig:
    """How long and on what to train."""

    minutes: float = 5.0
    """Wall-clock budget for the optimiser steps."""
    max_steps: int | None = None
    """Stop after this many steps even if time is left (None: the time budget alone)."""
    window: int = 128
    """Tokens per sequence."""
    batch: int = 8
    """Sequences per step."""
    learning_rate: float = 1e-3
    """AdamW peak learning rate (linear warm-up over the first 20 steps)."""
    corpus_tokens: int = 400_000
    """Tokens of corpus to cycle through."""
    seed: int = 0
    """Seed of the batch order."""


def train_model(checkpoint: Path, out: Path, corpus: Path | None, cfg: ModelTrainingConfig) -> dict[str, float]:
    """Train, save to ``out``; returns the first and last loss and the steps taken."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = corpus_ids(checkpoint, corpus, cfg.corpus_tokens, int(model.config.vocab_size))
    n_windows = len(ids) // cfg.window
    windows = torch.tensor(ids[: n_windows * cfg.window]).view(n_windows, cfg.window)  # [N, S]
    generator = torch.Generator().manual_seed(cfg.seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    model.train()
    deadline = time.monotonic() + cfg.minutes * 60
    losses: list[float] = []
    order = torch.randperm(n_windows, generator=generator)
    step = 0
    while time.monotonic() < deadline and (cfg.max_steps is None or step < cfg.max_steps):
        start = (step * cfg.batch) % max(1, n_windows - cfg.batch)
        batch = windows[order[start : start + cfg.batch]]  # [B, S]
        for group in optimiser.param_groups:
            group["lr"] = cfg.learning_rate * min(1.0, (step + 1) / 20)
        out_ = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
        optimiser.zero_grad(set_to_none=True)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        losses.append(out_.loss.detach().item())
        if step % 20 == 0:
            log.info("step %d: loss %.3f", step, losses[-1])
        step += 1
    model.eval()
    storage_dtype = model_storage_dtype(checkpoint)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(storage_dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, out / name)
    window = max(1, min(10, len(losses) // 2))  # first and last steps, never overlapping
    head = sum(losses[:window]) / window
    tail = sum(losses[-window:]) / window
    log.info("trained %d steps: loss %.3f -> %.3f; written to %s", step, head, tail, out)
    return {"steps": step, "loss_first": head, "loss_last": tail}


def model_storage_dtype(checkpoint: Path) -> torch.dtype:
    config = json.loads((checkpoint / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)
