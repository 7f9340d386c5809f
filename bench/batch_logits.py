"""How far batching moves the logits: the step loop's scheme (``workers/step_loop.py``) redone on plain
transformers (eager experts, float32) with the embedded default model, against ``generate()`` of each request alone.

    python bench/batch_logits.py [--chunk 5] [--new-tokens 16]

The scheme, with the step loop's own cache assembling (``workers/batch_cache.py``): every prompt arrives at once and
is prefilled batched, ``--chunk`` tokens per pass for all rows together (the rows in order, each taking what is left
of the budget), each row's past left-padded and its chunk right-padded, with an attention mask and each row's own
positions; then decode steps over a left-padded ``DynamicCache`` of all rows. ``--alone`` prefills each prompt alone
instead (chunked, as before batched prefill).

Prints the largest absolute difference of any logit, for each row's last prefill position and for every batched
decode step, the largest logit's magnitude for scale, and whether every greedy token agrees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.default_model import ensure_default_checkpoint
from workers.batch_cache import assemble, cut, prefill_inputs

PROMPTS = [[35, 80, 111, 109, 111, 69, 32, 40], [1, 2, 3], list(range(100, 113)), [7] * 5, [200, 13, 54, 90, 18, 33]]


def main() -> None:
    from transformers import AutoModelForCausalLM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk", type=int, default=5, help="prefill tokens per pass, all rows together")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--alone", action="store_true", help="prefill each prompt alone (chunked), not batched")
    args = p.parse_args()
    model = AutoModelForCausalLM.from_pretrained(ensure_default_checkpoint(), dtype=torch.float32,
                                                 experts_implementation="eager")
    device, config = torch.device("cpu"), model.config
    worst_decode = worst_prefill = scale = 0.0
    rows: list[dict] = []
    agree = True
    with torch.inference_mode():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
            alone = torch.stack(out.logits)[:, 0]  # [new tokens, V]
            scale = max(scale, alone.abs().max().item())
            rows.append({"ids": ids, "kv": None, "length": 0, "tokens": out.sequences[0, len(ids):].tolist(),
                         "alone": alone, "passes": 0})
        groups = [[r] for r in rows] if args.alone else [rows]
        for group in groups:
            while any(r["length"] < len(r["ids"]) for r in group):
                budget, taken = args.chunk, []
                for r in group:
                    n = min(len(r["ids"]) - r["length"], budget)
                    if n > 0:
                        taken.append((r, r["ids"][r["length"]:r["length"] + n]))
                        budget -= n
                inputs = prefill_inputs([r["kv"] for r, _ in taken], [r["length"] for r, _ in taken],
                                        [c for _, c in taken], config, device)
                logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                               position_ids=inputs.position_ids, cache=inputs.cache, use_cache=True,
                               logits_to_keep=inputs.last_positions).logits
                for i, (r, chunk) in enumerate(taken):
                    r["kv"] = cut(inputs.cache, i, inputs.past_width - r["length"], inputs.past_width + len(chunk))
                    r["length"] += len(chunk)
                    r["passes"] += 1
                    if r["length"] == len(r["ids"]):
                        worst_prefill = max(worst_prefill, (logits[i, -1] - r["alone"][0]).abs().max().item())
                        agree &= int(logits[i, -1].argmax()) == r["tokens"][0]
        for step in range(args.new_tokens - 1):
            cache, mask = assemble([r["kv"] for r in rows], [r["length"] for r in rows], config, device)
            longest = mask.shape[1]
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype)], dim=1)
            logits = model(input_ids=torch.tensor([[r["tokens"][step]] for r in rows]), attention_mask=mask,
                           position_ids=torch.tensor([[r["length"]] for r in rows]), cache=cache,
                           use_cache=True).logits
            for i, r in enumerate(rows):
                worst_decode = max(worst_decode, (logits[i, -1] - r["alone"][step + 1]).abs().max().item())
                agree &= int(logits[i, -1].argmax()) == r["tokens"][step + 1]
                r["kv"] = cut(cache, i, longest - r["length"], longest + 1)
                r["length"] += 1
    how = "alone" if args.alone else "batched"
    print(f"largest |logit difference|: batched decode {worst_decode:.3g}, prefill ({how}, {args.chunk} tokens a "
          f"pass) {worst_prefill:.3g}; largest |logit| {scale:.3g}; greedy tokens all agree: {agree}; prefill "
          f"passes per row {[r['passes'] for r in rows]}")


if __name__ == "__main__":
    main()
