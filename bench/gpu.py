"""The GPU benchmark at Qwen1.5-MoE-A2.7B scale: every policy, ``all_resident``, the floor and the ablation, in one
command, on a synthetic model generated on the machine itself.

    python bench/gpu.py [--out bench/results] [--budget-s 560]          # the real thing (CUDA, ~25 GB of experts)
    python bench/gpu.py --smoke --out /tmp/smoke                          # tiny dims on the CPU (CI)

What it does, in order:
1. Builds a ``qwen2_moe`` model with the dimensions of Qwen1.5-MoE-A2.7B (24 layers, 60 experts of
   3 x 2048 x 1408, top-4, shared expert 5632, bf16) with seeded weights generated on the device, and writes it once
   as a Hugging Face checkpoint (per-expert keys, one shard per layer) under ``--work``; the experts and the dense
   weights are shared by both routing regimes (hard links), only the router shard differs.
2. Routing regimes: the router rows are scaled so that the logits depend on the token (std 4), and in the
   ``skewed`` regime each expert's row is further scaled by ``rank^-0.8`` (a random rank per layer), so a quarter of
   the experts take most uses. On each regime's own traces it measures the top-k overlap between consecutive tokens,
   the share of uses taken by the top quarter of experts, and skip-layer gate accuracy at distance 2.
3. Traces ``--trace-tokens`` random tokens and trains the learned predictor (distance 2) with
   ``training.predictor_training``; records the routing of the measured generation (prompt + decode) with
   transformers (eager experts, same device and dtype) for the Belady floor and the token-exactness column.
4. Measures the host-to-device link with a pinned copy (CPU smoke: the emulated ``--link-gbps``).
5. Starts the runtime per configuration: ``all_resident``, then for each cache fraction ``promoe`` (learned
   predictor), ``lru``, ``lfu``, ``ondemand``; then the ablation steps at the first fraction. One warm-up request,
   then TTFT on a ``--prompt-tokens`` prompt and TPOT over ``--new-tokens`` tokens (greedy, batch 1).
   Configurations that would overrun ``--budget-s`` are skipped and listed as skipped.
6. Writes ``gpu-<device>.json`` and ``gpu-<device>.txt`` to ``--out`` and prints the table last. ``x resident`` is TPOT
   over ``all_resident``'s (TTFT ratio in ``ttft x res``), ``x floor`` the generation time over
   ``max(t_all_resident, B / W)`` (DESIGN.md section 7, ``B`` from ``bench.offload.belady_misses``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.offload import ABLATION, belady_misses
from tests.runtime import RuntimeProcess
from training.predictor_training import TrainingConfig, collect_trace, train_from_trace

ROUTER_LOGIT_STD = 4.0
"""Router rows scaled so that a token's logits have about this std: routing follows the token, not the init."""
REGIMES = {"random": 0.0, "skewed": 0.8}
"""Regime -> exponent of the per-expert router scale ``rank^-a`` (0: every expert alike)."""
POLICIES = ("promoe", "lru", "lfu", "ondemand")


@dataclass(frozen=True)
class BenchSpec:
    """Dimensions of the synthetic model and of the measured requests."""

    name: str
    """Directory name of the generated checkpoint (bump when anything below changes)."""
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
    """FFN width of the shared expert."""
    heads: int
    """Attention heads."""
    kv_heads: int
    """KV heads."""
    vocab: int
    """Vocabulary (random token ids)."""
    seed: int = 0
    """Seed of every weight."""


QWEN = BenchSpec("qwen15-moe-a27b-synthetic-v1", layers=24, experts=60, top_k=4, hidden=2048, inter=1408, shared=5632,
                 heads=16, kv_heads=16, vocab=151936)
SMOKE = BenchSpec("smoke-v1", layers=4, experts=16, top_k=4, hidden=64, inter=32, shared=64, heads=4, kv_heads=2,
                  vocab=320)


def model_config(spec: BenchSpec) -> Any:
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.shared,
        moe_intermediate_size=spec.inter, shared_expert_intermediate_size=spec.shared,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        num_experts=spec.experts, num_experts_per_tok=spec.top_k, norm_topk_prob=False, max_position_embeddings=8192,
        rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, tie_word_embeddings=False, eos_token_id=None,
        bos_token_id=None, pad_token_id=None)


def build_model(spec: BenchSpec, device: torch.device) -> Any:
    """The model with seeded weights generated on ``device`` (bf16); routers are set per regime by ``set_routers``."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(spec), dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    model.set_experts_implementation("eager")
    gen = torch.Generator(device).manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith(".mlp.gate.weight"):
                continue  # the router: per regime
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model


def set_routers(model: Any, spec: BenchSpec, regime: str) -> None:
    alpha = REGIMES[regime]
    with torch.no_grad():
        for layer in range(spec.layers):
            gate = model.model.layers[layer].mlp.gate.weight  # [E, H]
            gen = torch.Generator(gate.device).manual_seed(spec.seed * 1000 + 17 + layer)
            rank = torch.randperm(spec.experts, generator=gen, device=gate.device).float() + 1  # popularity rank
            rows = torch.randn(gate.shape, generator=gen, device=gate.device)
            scale = ROUTER_LOGIT_STD / spec.hidden ** 0.5 * rank.pow(-alpha)
            gate.copy_(rows * scale[:, None])


# ---------------------------------------------------------------- the checkpoint on disk
def write_checkpoint(model: Any, spec: BenchSpec, regime: str, work: Path) -> Path:
    """``work/<name>/<regime>``: config, index, the regime's router shard, hard links to the shared shards."""
    from safetensors.torch import save_file

    shared, out = work / spec.name / "shared", work / spec.name / regime
    weight_map: dict[str, str] = {}
    state = model.state_dict()
    dense = {k: v for k, v in state.items() if ".mlp.experts." not in k and not k.endswith(".mlp.gate.weight")}
    routers = {k: v for k, v in state.items() if k.endswith(".mlp.gate.weight")}
    shards: dict[str, list[str]] = {"dense.safetensors": sorted(dense)}
    for layer in range(spec.layers):
        shards[f"experts-{layer:02d}.safetensors"] = [
            f"model.layers.{layer}.mlp.experts.{e}.{m}_proj.weight" for e in range(spec.experts)
            for m in ("gate", "up", "down")]
    # the in-memory model is regenerated from the seed every run: reuse the files only if they came from the same
    # generator (spec, torch version, device type)
    device_type = next(model.parameters()).device.type
    marker = json.dumps({"spec": asdict(spec), "torch": torch.__version__, "device": device_type})
    if not (shared / "complete").is_file() or (shared / "complete").read_text() != marker:
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir(parents=True)
        started = time.perf_counter()
        save_file({k: v.cpu().clone() for k, v in dense.items()}, str(shared / "dense.safetensors"))
        for layer in range(spec.layers):
            experts = model.model.layers[layer].mlp.experts
            gate_up, down = experts.gate_up_proj.cpu(), experts.down_proj.cpu()  # [E, 2I, H], [E, H, I]
            tensors = {}
            for e in range(spec.experts):
                prefix = f"model.layers.{layer}.mlp.experts.{e}"
                tensors[f"{prefix}.gate_proj.weight"] = gate_up[e, : spec.inter].clone()
                tensors[f"{prefix}.up_proj.weight"] = gate_up[e, spec.inter :].clone()
                tensors[f"{prefix}.down_proj.weight"] = down[e].clone()
            save_file(tensors, str(shared / f"experts-{layer:02d}.safetensors"))
        (shared / "complete").write_text(marker)
        log(f"wrote the shared shards of {spec.name} in {time.perf_counter() - started:.1f} s")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name, keys in shards.items():
        os.link(shared / name, out / name)
        weight_map.update(dict.fromkeys(keys, name))
    save_file({k: v.cpu().clone() for k, v in routers.items()}, str(out / "router.safetensors"))
    weight_map.update(dict.fromkeys(routers, "router.safetensors"))
    model.config.save_pretrained(out)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


# ---------------------------------------------------------------- routing, predictor, reference
def routing_stats(chosen: torch.Tensor, n_experts: int) -> dict[str, float]:
    """``chosen`` [L, W, S, k]: consecutive-token top-k overlap and the top quarter's share of uses."""
    n_layers = chosen.shape[0]
    a, b = chosen[:, :, :-1], chosen[:, :, 1:]
    overlap = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean().item()  # share of k kept
    shares = []
    for layer in range(n_layers):
        counts = torch.bincount(chosen[layer].reshape(-1), minlength=n_experts).sort(descending=True).values
        shares.append(counts[: max(1, n_experts // 4)].sum().item() / counts.sum().item())
    return {"topk_overlap_consecutive": overlap, "top_quarter_share": sum(shares) / len(shares)}


def train_and_measure(model: Any, spec: BenchSpec, out: Path, trace_tokens: int, window: int) -> dict:
    gen = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(0, spec.vocab, (trace_tokens,), generator=gen).tolist()
    moe_layers = tuple(range(spec.layers))
    started = time.perf_counter()
    trace = collect_trace(model, moe_layers, ids, window)
    routers = torch.stack([model.model.layers[i].mlp.gate.weight.float().cpu() for i in moe_layers])  # [L, E, H]
    cfg = TrainingConfig(tokens=trace_tokens, window=window, distances=(2,))
    rows = train_from_trace(trace, routers, spec.top_k, out, cfg)
    stats = routing_stats(trace.chosen, spec.experts)
    stats["skip_layer_gate_accuracy_d2"] = sum(r["gate_reuse"] for r in rows) / len(rows)
    stats["learned_predictor_accuracy_d2"] = sum(r["learned"] for r in rows) / len(rows)
    stats["trace_and_train_s"] = time.perf_counter() - started
    return stats


def generation_trace(model: Any, spec: BenchSpec, prompt: list[int], new_tokens: int) -> tuple[list[int], list]:
    """Greedy tokens of transformers and the expert set (flat ids) each MoE layer needed, in execution order."""
    accesses: list[set[int]] = []
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(module: torch.nn.Module, args: tuple, output: tuple, i: int = i) -> None:
            accesses.append({i * spec.experts + int(e) for e in output[2].flatten().tolist()})

        handles.append(layer.mlp.gate.register_forward_hook(hook))
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    for handle in handles:
        handle.remove()
    return out[0, len(prompt):].tolist(), accesses


def link_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Median of 5 pinned host-to-device copies of ``nbytes``, timed with CUDA events."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.random_(0, 255)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for rep in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        if rep:  # the first is the warm-up
            times.append(start.elapsed_time(end) / 1e3)
    assert torch.equal(dst[:4096].cpu(), src[:4096])
    return nbytes / sorted(times)[len(times) // 2] / 1e9


# ---------------------------------------------------------------- the runtime
def run(ckpt: Path, root: Path, name: str, flags: list[str], prompt: list[int], new_tokens: int,
        warm_all: bool) -> dict:
    started = time.perf_counter()
    rt = RuntimeProcess(root / name, ckpt, *flags, ready_timeout_s=300.0)
    try:
        with rt.client(timeout_s=600.0) as client:
            client.generate(prompt_ids=prompt if warm_all else prompt[:16], max_new_tokens=4)
            done = client.generate(prompt_ids=prompt, max_new_tokens=new_tokens)
    finally:
        rt.stop()
    m = done.metrics
    ttft_ms, tpot_ms = float(m["ttft_ms"] or 0.0), float(m["tpot_ms"] or 0.0)
    return {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "stall_ms": m["stall_ms"], "hit_rate": m["hit_rate"],
            "goodpred": m["goodpred"], "bytes_loaded": m["bytes_loaded"],
            "time_ms": ttft_ms + tpot_ms * (len(done.token_ids) - 1), "tokens": done.token_ids,
            "wall_s": time.perf_counter() - started}


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny dimensions on the CPU: exercises every step in seconds")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda, or cpu with --smoke")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON and the table go")
    p.add_argument("--work", type=Path, default=None, help="checkpoint cache (default $PROMOE_CACHE/bench-gpu)")
    p.add_argument("--regimes", default="random,skewed")
    p.add_argument("--cache-fractions", default="0.25,0.5")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--ablation", choices=("first", "none"), default="first",
                   help="ablation steps at the first cache fraction of the first regime, or none")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 128 (smoke 32)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (smoke 8)")
    p.add_argument("--trace-tokens", type=int, default=None, help="predictor trace (default 4096; smoke 1024)")
    p.add_argument("--link-gbps", type=float, default=0.05, help="CPU only: the emulated link")
    p.add_argument("--budget-s", type=float, default=560.0, help="skip configurations that would end later")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    spec = SMOKE if args.smoke else QWEN
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    prompt_tokens = args.prompt_tokens or (32 if args.smoke else 128)
    new_tokens = args.new_tokens or (8 if args.smoke else 64)
    trace_tokens = args.trace_tokens or (1024 if args.smoke else 4096)
    window = 64 if args.smoke else 128
    regimes = [r for r in args.regimes.split(",") if r]
    policies = [q for q in args.policies.split(",") if q]
    if not set(regimes) <= set(REGIMES) or not set(policies) <= set(POLICIES):
        p.error(f"regimes among {sorted(REGIMES)}, policies among {POLICIES}")
    fractions = [float(f) for f in args.cache_fractions.split(",")]
    work = args.work or Path(os.environ.get("PROMOE_CACHE", Path.home() / ".cache" / "promoe")) / "bench-gpu"
    n_experts = spec.layers * spec.experts
    expert_nbytes = 3 * spec.hidden * spec.inter * 2
    free = shutil.disk_usage("/dev/shm").free
    if free < 1.05 * n_experts * expert_nbytes:
        raise SystemExit(f"/dev/shm has {free / 1e9:.1f} GB free; the host store needs "
                         f"{n_experts * expert_nbytes / 1e9:.1f} GB")
    torch.set_num_threads(os.cpu_count() or 1)

    # ------------------------------------------------ model, checkpoints, traces, predictors
    model = build_model(spec, device)
    log(f"built {spec.name} on {device} in {time.perf_counter() - t0:.1f} s")
    gen = torch.Generator().manual_seed(spec.seed + 2)
    prompt = torch.randint(0, spec.vocab, (prompt_tokens,), generator=gen).tolist()
    per_regime: dict[str, dict] = {}
    for regime in regimes:
        set_routers(model, spec, regime)
        ckpt = write_checkpoint(model, spec, regime, work)
        ref_model = model if device.type == "cuda" else build_float32(model)  # what each device computes in
        predictor = work / spec.name / regime / "predictor.safetensors"
        stats = train_and_measure(ref_model, spec, predictor, trace_tokens, window)
        tokens, accesses = generation_trace(ref_model, spec, prompt, new_tokens)
        per_regime[regime] = {"checkpoint": ckpt, "predictor": predictor, "stats": stats, "tokens": tokens,
                              "accesses": accesses}
        log(f"{regime}: {json.dumps({k: round(v, 3) for k, v in stats.items()})}")
    del model, ref_model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        link_gbps, link_how = link_bandwidth_gbps(device), "pinned host-to-device copy of 1 GiB, median of 5"
        torch.cuda.empty_cache()  # leave the GPU to the runtime's processes
    else:
        link_gbps, link_how = args.link_gbps, "emulated (--link-gbps)"
    log(f"link {link_gbps:.2f} GB/s ({link_how})")

    # ------------------------------------------------ the configurations
    sizes = {f: max(spec.top_k, round(n_experts * f)) for f in fractions}
    common = ["--device", device.type, "--lookahead", "2"]
    if device.type == "cpu":
        common += ["--link-gbps", str(link_gbps)]
    cases: list[tuple[str, str, int, list[str], bool]] = []
    for regime in regimes:
        cases.append((regime, "all_resident", n_experts, ["--policy", "lru"], True))
    for f in fractions:  # the smaller cache of both regimes first: if the budget runs out, larger caches go
        for regime in regimes:
            pred = ["--predictor", str(per_regime[regime]["predictor"])]
            for policy in policies:
                cases.append((regime, policy, sizes[f], ["--policy", policy, *(pred if policy == "promoe" else [])],
                              False))
    if args.ablation == "first":
        pred = ["--predictor", str(per_regime[regimes[0]]["predictor"])]
        for step, flags in ABLATION[:-1]:  # the last step is promoe itself, measured above
            cases.append((regimes[0], f"ablation: {step}", sizes[fractions[0]], ["--policy", "promoe", *pred, *flags],
                          False))
    rows, skipped = [], []
    longest_s = 0.0
    root = Path(tempfile.mkdtemp(prefix="promoe-bench-"))  # short: ipc:// socket paths have a length limit
    for i, (regime, name, cache, flags, warm_all) in enumerate(cases):
        if time.perf_counter() - t0 + longest_s > args.budget_s:
            skipped.append(f"{regime} {name} @ {cache}")
            continue
        row = run(per_regime[regime]["checkpoint"], root, f"c{i}", [*flags, "--cache-experts", str(cache), *common],
                  prompt, new_tokens, warm_all)
        longest_s = max(longest_s, row["wall_s"])
        rows.append({"regime": regime, "policy": name, "cache_experts": cache, **row})
        log(f"{regime} {name} @ {cache}: TTFT {row['ttft_ms']:.1f} ms, TPOT {row['tpot_ms']:.2f} ms "
            f"({row['wall_s']:.0f} s)")
    shutil.rmtree(root, ignore_errors=True)
    finish(rows, skipped, per_regime, spec, device, link_gbps, link_how, expert_nbytes, args.out, t0)
    return 0


def build_float32(model: Any) -> Any:
    """CPU reference: the bf16 weights in float32, which is what the CPU runtime computes with."""
    import copy

    return copy.deepcopy(model).float()


def finish(rows: list[dict], skipped: list[str], per_regime: dict, spec: BenchSpec, device: torch.device,
           link_gbps: float, link_how: str, expert_nbytes: int, out: Path, t0: float) -> None:
    resident = {r["regime"]: r for r in rows if r["policy"] == "all_resident"}
    for row in rows:
        info, base = per_regime[row["regime"]], resident.get(row["regime"])
        b = belady_misses(info["accesses"], row["cache_experts"]) * expert_nbytes
        row["belady_bytes"] = b
        row["exact"] = row.pop("tokens") == info["tokens"]
        if base is not None:
            floor_ms = max(base["time_ms"], b / (link_gbps * 1e9) * 1e3)
            row.update(vs_all_resident=row["tpot_ms"] / base["tpot_ms"], ttft_vs_all_resident=row["ttft_ms"] /
                       base["ttft_ms"], vs_floor=row["time_ms"] / floor_ms)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"device": name, "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "spec": asdict(spec), "link_gbps": link_gbps, "link_measured_by": link_how,
        "wall_s": time.perf_counter() - t0, "skipped": skipped,
        "routing": {r: v["stats"] for r, v in per_regime.items()}}
    table = format_table(rows, meta)
    out.mkdir(parents=True, exist_ok=True)
    slug = "cpu-smoke" if device.type == "cpu" else name.lower().replace(" ", "-")
    (out / f"gpu-{slug}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"gpu-{slug}.txt").write_text(table + "\n")
    print(table)


def format_table(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['device']}, torch {meta['torch']}, {meta['date']}, link {meta['link_gbps']:.2f} GB/s "
             f"({meta['link_measured_by']}), {meta['wall_s']:.0f} s"]
    for regime, s in meta["routing"].items():
        lines.append(f"routing {regime}: top-k overlap {s['topk_overlap_consecutive']:.3f}, top quarter share "
                     f"{s['top_quarter_share']:.3f}, gate reuse d=2 {s['skip_layer_gate_accuracy_d2']:.3f}, "
                     f"learned d=2 {s['learned_predictor_accuracy_d2']:.3f}")
    head = ("regime", "policy", "cache", "TTFT ms", "TPOT ms", "stall ms", "hit", "GoodPred", "ttft x res",
            "x resident", "x floor", "exact")
    lines.append(f"{head[0]:8} {head[1]:26}" + "".join(f" {h:>10}" for h in head[2:]))
    for r in rows:
        cells = [r["cache_experts"], r["ttft_ms"], r["tpot_ms"], r["stall_ms"], r["hit_rate"], r["goodpred"],
                 r.get("ttft_vs_all_resident"), r.get("vs_all_resident"), r.get("vs_floor"), r["exact"]]
        text = [f"{c:.3g}" if isinstance(c, float) else ("-" if c is None else str(c)) for c in cells]
        lines.append(f"{r['regime']:8} {r['policy']:26}" + "".join(f" {t:>10}" for t in text))
    for regime in meta["routing"]:  # the goals: promoe vs lru (TTFT, TPOT), promoe vs all_resident
        by = {(r["policy"], r["cache_experts"]): r for r in rows if r["regime"] == regime}
        for (policy, cache), r in sorted(by.items(), key=lambda item: item[0][1]):
            lru = by.get(("lru", cache))
            if policy == "promoe" and lru is not None:
                lines.append(f"{regime} cache {cache}: promoe vs lru  TTFT x{lru['ttft_ms'] / r['ttft_ms']:.2f}  "
                             f"TPOT x{lru['tpot_ms'] / r['tpot_ms']:.2f}  (goal at 25%: x2 TTFT, x1.5 TPOT); "
                             f"TPOT vs all_resident x{r.get('vs_all_resident') or float('nan'):.2f} (goal at 50%: "
                             "<= 1.5)")
    for skip in meta["skipped"]:
        lines.append(f"skipped (time budget): {skip}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
