"""Per-token time of the runtime on CPU against plain transformers, and what crosses ZeroMQ per token.

    python bench/cpu_tokens.py [--new-tokens 64] [--link-gbps G]

For each (policy, cache size) it starts the runtime, runs one warm-up request and one measured request on the same
prompt, and prints TTFT, TPOT, hit rate, stall, ZeroMQ messages per token, the median one-way latency of the
per-layer GateDecided message, and the median Ping round trip to the (idle) predictor. The last row is
transformers' own generate() in this process (eager experts, all weights in memory), timed by a streamer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.runtime_process import RuntimeProcess
from models.default_model import ensure_default_checkpoint

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"


def plain_transformers(checkpoint: Path, new_tokens: int) -> tuple[float, float]:
    """Median TTFT and TPOT over three runs, from per-token timestamps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, experts_implementation="eager")
    ids = torch.tensor([AutoTokenizer.from_pretrained(checkpoint)(PROMPT, add_special_tokens=False)["input_ids"]])

    class Stamps:
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    ttfts, tpots = [], []
    for _ in range(3):
        stamps = Stamps()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=stamps)
        first, last = stamps.times[1], stamps.times[-1]  # times[0] is the prompt
        ttfts.append((first - start) * 1e3)
        tpots.append((last - first) / (len(stamps.times) - 2) * 1e3)
    return statistics.median(ttfts), statistics.median(tpots)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--link-gbps", type=float, default=None)
    p.add_argument("--predictor", type=Path, default=None, help="adds a promoe row with this trained predictor")
    args = p.parse_args()
    checkpoint = ensure_default_checkpoint()
    n_experts = 192
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        quarter = n_experts // 4
        cases = [("lru", n_experts), ("ondemand", quarter), ("lru", quarter), ("lfu", quarter), ("promoe", quarter)]
        if args.predictor is not None:
            cases.append(("promoe+learned", quarter))
        for policy, cache in cases:
            flags = ["--policy", policy.split("+")[0], "--cache-experts", str(cache)]
            if policy.endswith("+learned"):
                flags += ["--predictor", str(args.predictor)]
            if args.link_gbps:
                flags += ["--link-gbps", str(args.link_gbps)]
            rt = RuntimeProcess(Path(tmp) / f"{policy}{cache}", checkpoint, *flags)
            try:
                with rt.client() as client:
                    client.generate(prompt=PROMPT, max_new_tokens=args.new_tokens)  # warm-up
                    done = client.generate(prompt=PROMPT, max_new_tokens=args.new_tokens)
                    rtt = client.health().round_trip_us
            finally:
                rt.stop()
            m = done.metrics
            rows.append((f"{policy} cache={cache}", m["ttft_ms"], m["tpot_ms"], m["hit_rate"], m["stall_ms"],
                         m["goodpred"], m["zmq_messages_per_token"], m["gate_message_latency_us_p50"],
                         rtt.get("predictor")))
    ttft, tpot = plain_transformers(checkpoint, args.new_tokens)
    rows.append(("transformers eager (1 process)", ttft, tpot, None, None, None, None, None, None))
    header = ("config", "TTFT ms", "TPOT ms", "hit", "stall ms", "GoodPred", "msgs/tok", "gate msg us p50",
              "predictor rtt us")
    print(f"{header[0]:32}" + "".join(f" {h:>10}" for h in header[1:]))
    for name, *vals in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in vals]
        print(f"{name:32}" + "".join(f" {c:>10}" for c in cells))


if __name__ == "__main__":
    main()
