"""Quality of quantized experts: perplexity on held-out text and greedy-token agreement with the unquantized model.

    python bench/quality.py [--model-path DIR] [--tokens 4096] [--new-tokens 64] [--group-size 64] [--json PATH]

The model is the trained copy of the default model (``bench/routing_realism.py`` makes it, once, under
``~/.cache/promoe/qwen-moe-tiny-trained-v1``; its training read the first ``ModelTrainingConfig.corpus_tokens``
tokens of the built-in corpus, so the held-out text here is the ``--tokens`` tokens right after them). For the
checkpoint's dtype (bf16 on disk, computed in float32 as the CPU runtime does), int8 and int4, the model's routed
experts are replaced by exactly the weights the runtime computes with (``models.quantized_reference``) and:

- perplexity over non-overlapping windows of ``--window`` tokens of the held-out text;
- next-token agreement: the share of held-out positions whose argmax equals the unquantized model's;
- greedy agreement: per prompt, ``--new-tokens`` greedy tokens; the share of positions equal to the unquantized
  model's tokens, and the tokens generated before the first difference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.offload import PROMPTS
from models.checkpoint import open_checkpoint
from models.default_model import cache_root
from models.quantized_reference import use_dequantized_experts
from training.model_training import ModelTrainingConfig
from training.predictor_training import corpus_ids

EXTRA_PROMPTS = ["import json\n\n\ndef load(path):\n", "    def __repr__(self):\n        return"]


def load_model(checkpoint: Path, expert_dtype: str | None, group_size: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # grouped_mm: the experts' parameters as the eager loop uses them, ~9x faster on the CPU (float rounding aside)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, experts_implementation="grouped_mm")
    if expert_dtype is not None:
        layout = open_checkpoint(checkpoint).layout(4, 1, "float32", expert_dtype=expert_dtype, group_size=group_size)
        use_dequantized_experts(model, layout)
    model.eval()
    return model


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: list[int], window: int) -> tuple[float, torch.Tensor]:
    """(perplexity, argmax next token at every predicted position ``[n_windows * (window - 1)]``)."""
    n = len(ids) // window
    windows = torch.tensor(ids[: n * window]).view(n, window)
    nll, count, argmax = 0.0, 0, []
    for w in range(n):
        logits = model(windows[w : w + 1], use_cache=False).logits[0, :-1].float()  # [window - 1, vocab]
        target = windows[w, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        count += target.numel()
        argmax.append(logits.argmax(-1))
    return math.exp(nll / count), torch.cat(argmax)


@torch.inference_mode()
def greedy(model: torch.nn.Module, checkpoint: Path, new_tokens: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    out = []
    for prompt in [*PROMPTS, *EXTRA_PROMPTS]:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False)
        out.append(generated[0, ids.shape[1]:].tolist())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-path", type=Path, default=cache_root() / "qwen-moe-tiny-trained-v1",
                   help="checkpoint (default: the trained copy of the default model, bench/routing_realism.py)")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens for perplexity")
    p.add_argument("--window", type=int, default=128, help="tokens per perplexity window (the training's)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not (args.model_path / "config.json").is_file():
        raise SystemExit(f"{args.model_path}: no checkpoint (make the trained copy with bench/routing_realism.py)")
    started = time.perf_counter()
    ckpt = open_checkpoint(args.model_path)
    skip = ModelTrainingConfig().corpus_tokens  # the training read these
    ids = corpus_ids(args.model_path, None, skip + args.tokens, int(ckpt.config["vocab_size"]))[skip:]
    torch.manual_seed(0)
    rows, base_argmax, base_tokens = [], None, None
    for expert_dtype in (None, "int8", "int4"):
        model = load_model(args.model_path, expert_dtype, args.group_size)
        ppl, argmax = perplexity(model, ids, args.window)
        tokens = greedy(model, args.model_path, args.new_tokens)
        if base_argmax is None or base_tokens is None:
            base_argmax, base_tokens = argmax, tokens
        same = [sum(a == b for a, b in zip(t, b_, strict=True)) for t, b_ in zip(tokens, base_tokens, strict=True)]
        prefix = [next((i for i, (a, b) in enumerate(zip(t, b_, strict=True)) if a != b), len(t))
                  for t, b_ in zip(tokens, base_tokens, strict=True)]
        rows.append({"expert_dtype": expert_dtype or ckpt.storage_dtype(), "group_size": args.group_size,
                     "perplexity": ppl, "next_token_agreement": float((argmax == base_argmax).float().mean()),
                     "greedy_agreement": sum(same) / sum(map(len, tokens)), "greedy_tokens": sum(map(len, tokens)),
                     "greedy_prefix_mean": sum(prefix) / len(prefix)})
    base = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_increase"] = row["perplexity"] / base - 1
    print(f"quality of {args.model_path.name}: {len(ids)} held-out tokens (after the training's {skip}), windows of "
          f"{args.window}; {len(base_tokens or [])} prompts x {args.new_tokens} greedy tokens; group size "
          f"{args.group_size}; {time.perf_counter() - started:.0f} s")
    head = ("experts", "perplexity", "increase", "next-token agree", "greedy agree", "same prefix")
    print(f"{head[0]:10}" + "".join(f" {h:>17}" for h in head[1:]))
    for r in rows:
        print(f"{r['expert_dtype']:10} {r['perplexity']:17.4f} {r['perplexity_increase']:17.2%} "
              f"{r['next_token_agreement']:17.3f} {r['greedy_agreement']:17.3f} {r['greedy_prefix_mean']:17.1f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
