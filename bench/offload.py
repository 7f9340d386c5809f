"""Every policy, ``all_resident`` and the ablation steps over the same prompts, on CPU with an emulated link.

    python bench/offload.py [--link-gbps 0.25] [--cache-fractions 0.125,0.25,0.5] [--predictor FILE]
                            [--routing-predictor FILE] [--model-path DIR]
                            [--new-tokens 32] [--repeat N] [--policies lru,promoe] [--host-compute never,auto]
                            [--no-ablation] [--expert-dtypes default,int8,int4]
                            [--no-stand-in-cores] [--json PATH] [--plot PATH]

Each configuration starts the runtime, runs one warm-up request, then the measured prompts (greedy). For
``all_resident`` (cache = every expert) the warm-up is the measured prompts themselves, so that every expert they
use is already on the device. The floor (DESIGN.md section 7) is ``max(t_all_resident, B / W)``: ``B`` is the
bytes that Belady's optimal replacement must load for the routing trace of the measured prompts (recorded here
with transformers, which the runtime matches token for token), ``W`` the emulated link. The ablation adds the
paper's techniques one by one to prefetching at 25% cache. With ``--repeat N`` every case runs N times, one round
of all cases after another (so that a machine's drifting noise falls on every case alike), and each row is the
medians of its runs. ``--host-compute`` runs every policy with each mode given (``launch.py --host-compute``; the
resident and ablation cases always run ``never``); its rows are named ``POLICY+host-MODE`` (``never`` keeps the
plain name). ``--expert-dtypes`` runs every policy row once per expert dtype (``launch.py --expert-dtype``;
``default``: the checkpoint's), each with its own bytes per expert; a quantized row's ``exact`` compares with the
unquantized all-resident tokens, so it says whether quantization changed the greedy output.

The CPU stand-in's model of a GPU (``launch.py --stand-in-cores``, on by default wherever two cores are usable): the
inference worker computes alone on one core with one thread, as a GPU computes beside its host; the loader (its
memcpy stands for the copy engine's DMA, its pacing sleeps), the predictor and the coordinator share the other
cores. Every policy runs under the same placement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from coordinator.runtime_process import RuntimeProcess
from models.checkpoint import open_checkpoint
from models.default_model import ensure_default_checkpoint

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "import os\n\nfor root, dirs, files in os.walk('.'):\n    for name in files:",
]
ABLATION = [
    ("prefetch only", ["--no-early-preemption", "--no-reordered-inference", "--chunks-per-expert", "1"]),
    ("+ early preemption", ["--no-reordered-inference", "--chunks-per-expert", "1"]),
    ("+ reordering", ["--chunks-per-expert", "1"]),
    ("+ chunking (= promoe)", ["--chunks-per-expert", "3"]),
]


def routing_trace(checkpoint: Path, new_tokens: int) -> list[list[set[int]]]:
    """Per prompt, the list of expert sets (flat ids) each MoE layer needed, in execution order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = open_checkpoint(checkpoint)
    moe_layers = ckpt.moe_layers()
    per_layer = int(ckpt.config["num_experts"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, experts_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    accesses: list[set[int]] = []
    handles = []
    for i, layer in enumerate(moe_layers):
        def hook(module: torch.nn.Module, args: tuple, output: tuple, i: int = i) -> None:
            accesses.append({i * per_layer + int(e) for e in output[2].flatten().tolist()})

        handles.append(model.model.layers[layer].mlp.gate.register_forward_hook(hook))
    traces = []
    for prompt in PROMPTS:
        accesses = []
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        traces.append(accesses)
    for handle in handles:
        handle.remove()
    return traces


def belady_misses(accesses: list[set[int]], capacity: int, count_from: int = 0) -> int:
    """Misses of the optimal replacement that knows the future (a layer's whole set is needed at once), counted from
    access ``count_from`` on (the accesses before it only warm the cache)."""
    next_use: list[dict[int, int]] = [{} for _ in accesses]
    upcoming: dict[int, int] = {}
    for t in range(len(accesses) - 1, -1, -1):
        next_use[t] = dict(upcoming)
        for e in accesses[t]:
            upcoming[e] = t
    cache: set[int] = set()
    misses = 0
    for t, needed in enumerate(accesses):
        for e in sorted(needed):
            if e in cache:
                continue
            misses += t >= count_from
            if len(cache) >= capacity:
                others = [c for c in cache if c not in needed] or list(cache)
                victim = max(others, key=lambda c: next_use[t].get(c, len(accesses)))
                cache.discard(victim)
            cache.add(e)
    return misses


def run(checkpoint: Path, root: Path, name: str, flags: list[str], new_tokens: int, warm_all: bool) -> dict:
    rt = RuntimeProcess(root / name.replace(" ", "_").replace("+", "p").replace("(", "").replace(")", ""),
                        checkpoint, *flags)
    try:
        with rt.client() as client:
            for prompt in PROMPTS if warm_all else PROMPTS[:1]:
                client.generate(prompt=prompt, max_new_tokens=4)
            done = [client.generate(prompt=p, max_new_tokens=new_tokens) for p in PROMPTS]
    finally:
        rt.stop()
    n = len(done)
    metric = lambda key: sum((d.metrics[key] or 0) for d in done) / n  # noqa: E731
    gp = [d.metrics["goodpred"] for d in done if d.metrics["goodpred"] is not None]
    return {
        "ttft_ms": metric("ttft_ms"), "tpot_ms": metric("tpot_ms"), "hit_rate": metric("hit_rate"),
        "stall_ms": metric("stall_ms"), "goodpred": sum(gp) / len(gp) if gp else None,
        "bytes_loaded": sum(d.metrics["bytes_loaded"] for d in done),
        "host_experts_per_token": sum(d.metrics.get("host_experts") or 0 for d in done)
        / max(1, sum(len(d.token_ids) for d in done)),
        "host_ms": sum(d.metrics.get("host_ms") or 0 for d in done),
        "host_predicted_ms": sum(d.metrics.get("host_predicted_ms") or 0 for d in done),
        "bytes_per_token": sum(d.metrics["bytes_loaded"] for d in done) / max(1, sum(len(d.token_ids) for d in done)),
        "time_ms": sum(d.metrics["ttft_ms"] + d.metrics["tpot_ms"] * (len(d.token_ids) - 1) for d in done),
        "tokens": [d.token_ids for d in done],
    }


def median_of(runs: list[dict]) -> dict:
    """One row from repeated runs of a case: the median of every number (of those that are not None), the
    generated tokens if every run generated the same ones (else None), and how many runs."""
    row: dict = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if key == "tokens":
            row[key] = values[0] if all(v == values[0] for v in values) else None
        else:
            numbers = [v for v in values if v is not None]
            row[key] = statistics.median(numbers) if numbers else None
    row["runs"] = len(runs)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--link-gbps", type=float, default=0.25)
    p.add_argument("--cache-fractions", default="0.125,0.25,0.5")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--predictor", type=Path, default=None, help="also run promoe with this trained predictor")
    p.add_argument("--routing-predictor", type=Path, default=None,
                   help="also run promoe with this routing predictor (python -m training.routing_fit)")
    p.add_argument("--model-path", type=Path, default=None,
                   help="checkpoint to run (default: the embedded default model)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every case N times, all cases interleaved in each round, and report medians")
    p.add_argument("--policies", default="ondemand,lru,lfu,promoe", help="policies to run (comma list)")
    p.add_argument("--host-compute", default="never",
                   help="host-compute modes to run every policy with (comma list of auto, never, always)")
    p.add_argument("--no-ablation", action="store_true", help="leave out the ablation rows")
    p.add_argument("--expert-dtypes", default="default",
                   help="run the policies with each of these --expert-dtype values (comma list; default: the "
                        "checkpoint's dtype)")
    p.add_argument("--no-stand-in-cores", action="store_true",
                   help="let the operating system place the processes (default: launch.py --stand-in-cores)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--plot", type=Path, default=Path("bench/results/offload-tpot.png"), help="PNG of TPOT vs cache")
    args = p.parse_args()
    checkpoint = args.model_path or ensure_default_checkpoint()
    ckpt = open_checkpoint(checkpoint)
    lay = ckpt.layout(n_slots=4, n_chunks=1, compute_dtype="float32")
    n_experts = lay.n_experts
    dtypes = [None if d == "default" else d for d in args.expert_dtypes.split(",")]
    expert_nbytes = {d: ckpt.layout(n_slots=4, n_chunks=1, compute_dtype="float32", expert_dtype=d).expert_nbytes
                     for d in dtypes}
    sizes = [max(lay.top_k, round(n_experts * float(f))) for f in args.cache_fractions.split(",")]
    stand_in = not args.no_stand_in_cores and len(os.sched_getaffinity(0)) >= 2
    # flags of every case: the emulated link and the processes' placement
    every = ["--link-gbps", str(args.link_gbps), "--max-batch", "1",  # one request at a time, as every figure so far
             *(["--stand-in-cores"] if stand_in else [])]
    never = ["--host-compute", "never"]
    policies: list[tuple[str, list[str]]] = [
        (name if mode == "never" else f"{name}+host-{mode}", ["--host-compute", mode])
        for name in args.policies.split(",") for mode in args.host_compute.split(",")]
    if args.predictor is not None:
        policies.append(("promoe+learned", ["--predictor", str(args.predictor), *never]))
    if args.routing_predictor is not None:
        policies.append(("promoe+routing", ["--routing-predictor", str(args.routing_predictor), *never]))
    traces = routing_trace(checkpoint, args.new_tokens)
    accesses = [a for trace in traces for a in trace]
    rows = []
    started = time.perf_counter()
    cases: list[tuple[str, int, list[str], str | None]] = [
        ("all_resident", n_experts, ["--policy", "lru", "--cache-experts", str(n_experts), *never, *every], None)]
    cases += [(name, size, ["--policy", name.split("+")[0], "--cache-experts", str(size), *extra, *every,
                            *(["--expert-dtype", dtype] if dtype else [])], dtype)
              for size in sizes for name, extra in policies for dtype in dtypes]
    quarter = max(lay.top_k, n_experts // 4)
    cases += [(f"ablation: {step}", quarter, ["--policy", "promoe", "--cache-experts", str(quarter), *flags, *never,
                                              *every], None)
              for step, flags in ([] if args.no_ablation else ABLATION)]
    runs: list[list[dict]] = [[] for _ in cases]
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeat):  # every case once per round: noise drifts alike over all of them
            for i, (name, size, flags, dtype) in enumerate(cases):
                runs[i].append(run(checkpoint, Path(tmp), f"{name}{size}{dtype or ''}r{round_}", flags,
                                   args.new_tokens, warm_all=name == "all_resident"))
    for (name, size, _, dtype), case_runs in zip(cases, runs, strict=True):
        rows.append({"policy": name, "cache_experts": size, "expert_dtype": dtype or lay.storage_dtype,
                     "expert_nbytes": expert_nbytes[dtype], **median_of(case_runs)})
    resident = rows[0]
    resident_tokens = resident["tokens"]
    for row in rows:
        b = belady_misses(accesses, row["cache_experts"]) * row["expert_nbytes"]
        floor_ms = max(resident["time_ms"], b / (args.link_gbps * 1e9) * 1e3)
        row["belady_bytes"] = b
        row["vs_all_resident"] = row["tpot_ms"] / resident["tpot_ms"]
        row["vs_floor"] = row["time_ms"] / floor_ms
        row["exact"] = resident_tokens is not None and row.pop("tokens") == resident_tokens
    print_table(rows, args, stand_in, time.perf_counter() - started)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    plot(rows, sizes, args.plot)


def print_table(rows: list[dict], args: argparse.Namespace, stand_in: bool, elapsed_s: float) -> None:
    print(f"CPU, emulated link {args.link_gbps} GB/s, {len(PROMPTS)} prompts x {args.new_tokens} tokens, "
          f"medians of {args.repeat} run(s), stand-in cores {'on' if stand_in else 'off'}, "
          f"{elapsed_s:.0f} s, load average {os.getloadavg()[0]:.1f}")
    head = ("policy", "experts", "cache", "TTFT ms", "TPOT ms", "hit", "stall ms", "KB/token", "GoodPred",
            "host/tok", "x resident", "x floor", "exact")
    print(f"{head[0]:28}" + "".join(f" {h:>10}" for h in head[1:]))
    for r in rows:
        cells = [r["expert_dtype"], r["cache_experts"], r["ttft_ms"], r["tpot_ms"], r["hit_rate"], r["stall_ms"],
                 r["bytes_per_token"] / 1e3, r["goodpred"], r["host_experts_per_token"], r["vs_all_resident"],
                 r["vs_floor"], r["exact"]]
        text = [f"{c:.3g}" if isinstance(c, float) else ("-" if c is None else str(c)) for c in cells]
        print(f"{r['policy']:28}" + "".join(f" {t:>10}" for t in text))


def plot(rows: list[dict], sizes: list[int], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, dtype in dict.fromkeys((r["policy"], r["expert_dtype"]) for r in rows
                                       if not r["policy"].startswith(("ablation", "all_"))):
        points = sorted((r["cache_experts"], r["tpot_ms"]) for r in rows
                        if (r["policy"], r["expert_dtype"]) == (policy, dtype))
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=f"{policy} {dtype}")
    resident = next(r for r in rows if r["policy"] == "all_resident")
    ax.axhline(resident["tpot_ms"], color="grey", linestyle="--", label="all_resident")
    ax.set_xlabel("cache (experts)")
    ax.set_ylabel("TPOT (ms)")
    ax.set_xticks(sizes)
    ax.legend()
    ax.set_title("TPOT vs cache size (CPU, emulated link)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
