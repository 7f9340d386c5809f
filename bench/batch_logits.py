"""How far batched decoding moves the logits: the step loop's scheme (``workers/step_loop.py``: prompts prefilled
alone, ``--prefill-chunk`` tokens at a time; decode steps over a left-padded ``DynamicCache`` with an attention
mask and each row's own positions) redone on plain transformers (eager experts, float32) with the embedded default
model, against ``generate()`` of each request alone.

    python bench/batch_logits.py [--chunk 5] [--new-tokens 16]

Prints the largest absolute difference of any logit, for the chunked prefill's last position and for every batched
decode step, and the largest logit's magnitude for scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.default_model import ensure_default_checkpoint

PROMPTS = [[35, 80, 111, 109, 111, 69, 32, 40], [1, 2, 3], list(range(100, 113)), [7] * 5, [200, 13, 54, 90, 18, 33]]


def main() -> None:
    from transformers import AutoModelForCausalLM, DynamicCache

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    model = AutoModelForCausalLM.from_pretrained(ensure_default_checkpoint(), dtype=torch.float32,
                                                 experts_implementation="eager")
    worst_decode = worst_prefill = scale = 0.0
    rows = []
    with torch.inference_mode():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
            alone = torch.stack(out.logits)[:, 0]  # [new tokens, V]
            scale = max(scale, alone.abs().max().item())
            cache, done = DynamicCache(config=model.config), 0
            while done < len(ids):
                chunk = ids[done:done + args.chunk]
                logits = model(input_ids=torch.tensor([chunk]), cache=cache, use_cache=True,
                               attention_mask=torch.ones((1, done + len(chunk)), dtype=torch.long)).logits
                done += len(chunk)
            worst_prefill = max(worst_prefill, (logits[0, -1] - alone[0]).abs().max().item())
            rows.append({"kv": [(k, v) for k, v, *_ in cache], "length": len(ids),
                         "tokens": out.sequences[0, len(ids):].tolist(), "alone": alone})
        for step in range(args.new_tokens - 1):
            longest = max(r["length"] for r in rows)
            data = [tuple(torch.cat([F.pad(r["kv"][layer][i], (0, 0, longest - r["length"], 0)) for r in rows])
                          for i in (0, 1)) for layer in range(len(rows[0]["kv"]))]
            cache = DynamicCache(data, config=model.config)
            mask = torch.zeros((len(rows), longest + 1), dtype=torch.long)
            for i, r in enumerate(rows):
                mask[i, longest - r["length"]:] = 1
            logits = model(input_ids=torch.tensor([[r["tokens"][step]] for r in rows]), attention_mask=mask,
                           position_ids=torch.tensor([[r["length"]] for r in rows]), cache=cache,
                           use_cache=True).logits
            layers = [(k, v) for k, v, *_ in cache]
            for i, r in enumerate(rows):
                worst_decode = max(worst_decode, (logits[i, -1] - r["alone"][step + 1]).abs().max().item())
                r["kv"] = [(torch.cat([r["kv"][n][0], k[i:i + 1, :, longest:]], 2),
                            torch.cat([r["kv"][n][1], v[i:i + 1, :, longest:]], 2)) for n, (k, v) in enumerate(layers)]
                r["length"] += 1
    print(f"largest |logit difference|: batched decode {worst_decode:.3g}, chunked prefill ({args.chunk} tokens) "
          f"{worst_prefill:.3g}; largest |logit| {scale:.3g}")


if __name__ == "__main__":
    main()
