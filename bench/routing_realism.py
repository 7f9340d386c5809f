"""Routing realism: predictor accuracy, routing figures and GoodPred on the seeded random default model and on a copy
of it trained for a few minutes on the built-in corpus (DESIGN.md section 4; issue: proactive caching).

    python bench/routing_realism.py [--train-minutes 5] [--trained DIR] [--offload] [--json PATH]

1. Trains the copy (once: reused from ``--trained`` when it is there).
2. For each model: traces the routing over corpus text the predictor is not trained on, prints the routing figures
   (consecutive-token overlap, share of the top quarter of experts, skip-layer gate accuracy), trains a predictor
   (``--train-predictor``'s code) and prints its held-out accuracy against the two baselines.
3. With ``--offload``: runs lru, lfu, promoe (gate reuse) and promoe with the learned predictor at 25% cache on the
   emulated link for each model and prints TPOT, hit rate, precision, FetchRate and GoodPred.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.offload import run
from models.checkpoint import load_router_weights, open_checkpoint
from models.default_model import cache_root, ensure_default_checkpoint
from training.model_training import ModelTrainingConfig, train_model
from training.predictor_training import DISTANCES, TrainingConfig, collect_trace, corpus_ids, train_predictor
from training.routing_stats import routing_stats

TRACE_TOKENS = 8192
"""Tokens traced for the routing figures (a different stretch of corpus than the predictor's training)."""


def routing_figures(checkpoint: Path) -> dict:
    from transformers import AutoModelForCausalLM

    ckpt = open_checkpoint(checkpoint)
    layout = ckpt.layout(n_slots=int(ckpt.config["num_experts_per_tok"]), n_chunks=1, compute_dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, experts_implementation="eager")
    ids = corpus_ids(checkpoint, None, 4 * TRACE_TOKENS, int(ckpt.config["vocab_size"]))[-TRACE_TOKENS:]
    trace = collect_trace(model, layout.moe_layers, ids, 128)
    stats = routing_stats(trace, load_router_weights(ckpt, layout), distances=(1, 2))
    return {"consecutive_overlap": stats.consecutive_overlap, "top_quarter_share": stats.top_quarter_share,
            **{f"gate_reuse_d{d}": v for d, v in stats.gate_reuse_accuracy.items()}, "tokens": stats.tokens}


def predictor_accuracy(checkpoint: Path, out: Path) -> dict:
    rows = train_predictor(checkpoint, out, None, TrainingConfig())
    means = {}
    for d in DISTANCES:
        sel = [r for r in rows if r["distance"] == d]
        for key in ("learned", "gate_reuse", "token_frequency"):
            means[f"{key}_d{d}"] = sum(r[key] for r in sel) / len(sel)
    return means


def offload_rows(checkpoint: Path, predictor: Path, link_gbps: float, new_tokens: int) -> list[dict]:
    lay = open_checkpoint(checkpoint).layout(n_slots=4, n_chunks=1, compute_dtype="float32")
    quarter = max(lay.top_k, lay.n_experts // 4)
    cases = [("lru", []), ("lfu", []), ("promoe", []), ("promoe+learned", ["--predictor", str(predictor)])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in cases:
            flags = ["--policy", name.split("+")[0], "--cache-experts", str(quarter), "--link-gbps", str(link_gbps),
                     *extra]
            row = run(checkpoint, Path(tmp), name, flags, new_tokens, warm_all=False)
            row.pop("tokens")
            rows.append({"policy": name, "cache_experts": quarter, **row})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train-minutes", type=float, default=5.0)
    p.add_argument("--trained", type=Path, default=cache_root() / "qwen-moe-tiny-trained-v1",
                   help="where the trained copy lives (trained once, then reused)")
    p.add_argument("--offload", action="store_true", help="also run the policies on the emulated link")
    p.add_argument("--link-gbps", type=float, default=0.25)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    random_model = ensure_default_checkpoint()
    if not (args.trained / "config.json").is_file():
        train_model(random_model, args.trained, None, ModelTrainingConfig(minutes=args.train_minutes))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, checkpoint in (("random", random_model), ("trained", args.trained)):
            predictor = Path(tmp) / f"{name}.safetensors"
            results[name] = {"routing": routing_figures(checkpoint),
                             "predictor": predictor_accuracy(checkpoint, predictor)}
            if args.offload:
                results[name]["offload"] = offload_rows(checkpoint, predictor, args.link_gbps, args.new_tokens)
    print(format_results(results, time.perf_counter() - started))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


def format_results(results: dict[str, dict], elapsed_s: float) -> str:
    lines = [f"routing realism ({elapsed_s:.0f} s)", ""]
    keys = list(next(iter(results.values()))["routing"])
    lines.append(f"{'routing figure':24}" + "".join(f" {name:>10}" for name in results))
    for key in keys:
        lines.append(f"{key:24}" + "".join(f" {r['routing'][key]:>10.3g}" for r in results.values()))
    lines += ["", f"{'held-out top-k accuracy':24}" + "".join(f" {name:>10}" for name in results)]
    for key in next(iter(results.values()))["predictor"]:
        lines.append(f"{key:24}" + "".join(f" {r['predictor'][key]:>10.3f}" for r in results.values()))
    for name, r in results.items():
        if "offload" not in r:
            continue
        lines += ["", f"{name} model, 25% cache: policy, TPOT ms, hit, stall ms, GoodPred"]
        for row in r["offload"]:
            gp = "-" if row["goodpred"] is None else f"{row['goodpred']:.3f}"
            lines.append(f"  {row['policy']:16} {row['tpot_ms']:8.1f} {row['hit_rate']:6.3f} {row['stall_ms']:8.0f}"
                         f" {gp:>6}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
