"""``bench/load.py`` at several client counts and ``--max-batch`` values, in one run (issue 14's figures).

    python bench/load_batch.py --clients 1,4,16,32 --max-batch 1,16 --requests 3 --max-new-tokens 8 \\
        --json bench/results/load-batch-cpu.json

One runtime per ``--max-batch`` value and ``--policy`` (the embedded default model or ``--model-path``,
``--cache-experts``; ``--repeat N``: every combination N times, in turn), the load of ``bench/load.py`` (closed-loop
clients, each with its own connection) at each client count on it, and per run: requests/s, tokens/s, latency
p50/p99, bytes loaded per generated token, the hit rate and the predictions received (the coordinator's totals
before and after the run). The machine's load
average (``os.getloadavg``) is recorded beside each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import free_tcp_address, run
from coordinator.runtime_process import RuntimeProcess
from models.default_model import ensure_default_checkpoint


def numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def sweep(max_batch: int, policy: str, args: argparse.Namespace) -> list[dict[str, object]]:
    root = Path(tempfile.mkdtemp(prefix="promoe-load-batch-"))
    checkpoint = args.model_path if args.model_path is not None else ensure_default_checkpoint()
    predictor = ["--predictor", str(args.predictor)] if args.predictor is not None else []
    if args.routing_predictor is not None:
        predictor = ["--routing-predictor", str(args.routing_predictor)]
    runtime = RuntimeProcess(root, checkpoint, "--policy", policy, *predictor, "--cache-experts",
                             str(args.cache_experts), "--max-queue", "256", "--max-batch", str(max_batch),
                             *(["--stand-in-cores"] if args.stand_in_cores else []),
                             ready_timeout_s=300, address=free_tcp_address())
    rows = []
    try:
        for clients in args.clients:
            with runtime.client() as client:
                before = client.stats()
            load_before = os.getloadavg()[0]
            result = run(runtime.address, argparse.Namespace(**{**vars(args), "clients": clients}))
            with runtime.client() as client:
                after = client.stats()
            loaded = float(after["bytes_loaded"] or 0) - float(before["bytes_loaded"] or 0)
            tokens = int(after["tokens_generated"] or 0) - int(before["tokens_generated"] or 0)
            uses = int(after["expert_uses"] or 0) - int(before["expert_uses"] or 0)
            hits = (float(after["hit_rate"] or 0) * int(after["expert_uses"] or 0)
                    - float(before["hit_rate"] or 0) * int(before["expert_uses"] or 0))
            result.update(max_batch=max_batch, policy=policy, cache_experts=args.cache_experts,
                          stand_in_cores=args.stand_in_cores, model_path=str(checkpoint),
                          predictor=str(args.predictor) if args.predictor else None,
                          routing_predictor=str(args.routing_predictor) if args.routing_predictor else None,
                          bytes_loaded=loaded, bytes_loaded_per_token=loaded / tokens if tokens else None,
                          hit_rate=hits / uses if uses else None,
                          predictions_received=int(after["predictions_received"] or 0)
                          - int(before["predictions_received"] or 0),
                          load_average_1m=[load_before, os.getloadavg()[0]])
            rows.append(result)
            print(f"{policy}, max-batch {max_batch:>2}, {clients:>2} clients: "
                  f"{result['requests_per_s']:.2f} requests/s, "
                  f"{result['tokens_per_s']:.1f} tokens/s, p50 {result['latency_p50_s']:.2f} s, "
                  f"p99 {result['latency_p99_s']:.2f} s, {result['bytes_loaded_per_token'] or 0:.0f} B loaded/token, "
                  f"hit rate {result['hit_rate'] or 0:.3f}, {result['predictions_received']} predictions, "
                  f"errors {result['errors'] or 'none'}, dropped {result['dropped']} "
                  f"(load average {load_before:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        runtime.stop()
        left = runtime.leftovers()
        shutil.rmtree(runtime.root, ignore_errors=True)
        if left:
            raise RuntimeError(f"the runtime left {left} behind")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=numbers, default=[1, 4, 16, 32])
    p.add_argument("--max-batch", type=numbers, default=[1, 16])
    p.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--policy", type=lambda text: text.split(","), default=["lru"],
                   help="policies, comma-separated: each gets its own runtime, in turn (interleaved with --repeat)")
    p.add_argument("--repeat", type=int, default=1, help="run every (max-batch, policy) this many times, in turn")
    p.add_argument("--cache-experts", type=int, default=48, help="default: a quarter of the 192 experts")
    p.add_argument("--text-prompts", action="store_true",
                   help="prompts from held-out text (bench/load.py --text-prompts), for a trained copy")
    p.add_argument("--model-path", type=Path, default=None, help="a checkpoint (default: the embedded default model)")
    p.add_argument("--predictor", type=Path, default=None, help="a trained predictor (launch.py --predictor)")
    p.add_argument("--routing-predictor", type=Path, default=None,
                   help="a routing predictor (launch.py --routing-predictor; instead of --predictor)")
    p.add_argument("--stand-in-cores", action="store_true",
                   help="the runtime with --stand-in-cores (the inference worker alone on one core)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = [{**row, "repeat": r} for r in range(args.repeat) for max_batch in args.max_batch for policy in args.policy
            for row in sweep(max_batch, policy, args)]
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": rows}, indent=1))
    return 0 if all(r["unanswered"] == 0 and r["dropped"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
