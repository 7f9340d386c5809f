"""Load time and peak memory of the runtime on a generated multi-GB checkpoint, against plainly reading its files.

    python bench/load_checkpoint.py [--experts-gb 2.4] [--dir /tmp/promoe-bench-ckpt] [--keep] [--json OUT]

1. Writes a ``qwen2_moe`` checkpoint of random bf16 weights with safetensors, sharded (~500 MB a shard) with a
   ``model.safetensors.index.json``, per-expert keys as real Qwen checkpoints have them.
2. (a) Plain read: ``cat`` of every file to /dev/null, after asking the kernel to drop the files from the page cache
   (``posix_fadvise(DONTNEED)``; ``fincore`` reports how much was still cached), then once more warm.
3. (b) Start-up: ``launch.py --model-path`` until every worker answers the coordinator, cold and warm page cache;
   the loader's own "host store filled" line gives the fill alone. The same for the embedded default model (72 MB
   of experts) gives the memory the four processes take without a big checkpoint.
   (c) Peak memory: every 100 ms or so, the sum over the launcher and all its children of PSS (``memory_full_info``):
   shared pages (the /dev/shm store) are divided among the processes mapping them, so they count once. RSS sums
   (which count shared pages once per process) are reported beside it.
4. Deletes the checkpoint unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from coordinator.client import PromoeClient  # noqa: E402

SHARD_NBYTES = 500 * 2**20
SAMPLE_S = 0.1


def write_checkpoint(out: Path, experts_gb: float, seed: int = 0) -> dict:
    """A qwen2_moe with hidden 1024, expert FFN 1024 (6 MiB bf16 experts), 64 experts per layer, enough layers."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    hidden, ffn, n_experts = 1024, 1024, 64
    expert_nbytes = 3 * hidden * ffn * 2
    layers = max(1, round(experts_gb * 1e9 / (expert_nbytes * n_experts)))
    config = Qwen2MoeConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2048, moe_intermediate_size=ffn,
                            shared_expert_intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=8,
                            num_key_value_heads=8, num_experts=n_experts, num_experts_per_tok=4,
                            max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items() if ".mlp.experts." not in k}
    for layer in range(layers):
        for e in range(n_experts):
            for m, shape in (("gate", (ffn, hidden)), ("up", (ffn, hidden)), ("down", (hidden, ffn))):
                shapes[f"model.layers.{layer}.mlp.experts.{e}.{m}_proj.weight"] = shape
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    shard_nbytes, names, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_nbytes
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_nbytes = {}, 0

    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[key] = tensor
        shard_nbytes += tensor.numel() * 2
        if shard_nbytes >= SHARD_NBYTES:
            flush()
    if shard:
        flush()
    total = sum(int(torch.Size(s).numel()) * 2 for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"layers": layers, "experts": layers * n_experts, "expert_nbytes": expert_nbytes,
            "experts_nbytes": layers * n_experts * expert_nbytes, "total_nbytes": total, "shards": len(names)}


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file())


def drop_page_cache(path: Path) -> str:
    for file in files_of(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return cached_summary(path)


def cached_summary(path: Path) -> str:
    """How much of the checkpoint is in the page cache, per ``fincore`` (if installed)."""
    if shutil.which("fincore") is None:
        return "unknown (no fincore)"
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files_of(path))],
                          capture_output=True, text=True)
    cached = sum(int(x) for x in done.stdout.split())
    return f"{cached / 1e9:.2f} GB cached"


def time_cat(path: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cat", *map(str, files_of(path))], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) over ``root`` and its descendants."""
    pss = rss = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += getattr(info, "pss", info.rss)
        rss += info.rss
    return pss, rss


def measure_startup(path: Path, run_root: Path, timeout_s: float = 600) -> dict:
    address = f"ipc://{run_root / 'client.sock'}"
    log_path = run_root / "runtime.log"
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "launch.py"), "--model-path", str(path), "--bind",
                                 address, "--run-root", str(run_root), "--policy", "lru", "--ready-timeout-s",
                                 str(timeout_s)], cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak_pss = peak_rss = 0
    ready_s = None
    try:
        with PromoeClient(address) as client:
            while time.perf_counter() - started < timeout_s:
                if proc.poll() is not None:
                    raise RuntimeError(f"launch.py exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
                pss, rss = tree_memory(root)
                peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
                try:
                    health = client.health(timeout_s=0.05)
                except TimeoutError:
                    continue
                if all(health.workers.values()):
                    ready_s = time.perf_counter() - started
                    break
                time.sleep(SAMPLE_S)
        settled_pss, settled_rss = tree_memory(root)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    text = log_path.read_text()
    fill = re.search(r"host store filled: .* in ([\d.]+) s", text)
    return {"ready_s": ready_s, "fill_s": float(fill[1]) if fill else None, "peak_pss_bytes": peak_pss,
            "peak_rss_bytes": peak_rss, "settled_pss_bytes": settled_pss, "settled_rss_bytes": settled_rss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts-gb", type=float, default=2.4)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "promoe-bench-ckpt")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    results: dict = {}
    try:
        if not (args.dir / "model.safetensors.index.json").is_file():
            t0 = time.perf_counter()
            results["checkpoint"] = write_checkpoint(args.dir, args.experts_gb)
            results["write_s"] = time.perf_counter() - t0
        files_nbytes = sum(f.stat().st_size for f in files_of(args.dir))
        results["files_nbytes"] = files_nbytes
        results["cache_before_cold_cat"] = drop_page_cache(args.dir)
        results["cat_cold_s"] = time_cat(args.dir)
        results["cat_warm_s"] = time_cat(args.dir)
        with tempfile.TemporaryDirectory() as run_root:
            results["cache_before_cold_start"] = drop_page_cache(args.dir)
            results["startup_cold"] = measure_startup(args.dir, Path(run_root))
        with tempfile.TemporaryDirectory() as run_root:
            results["cache_before_warm_start"] = cached_summary(args.dir)
            results["startup_warm"] = measure_startup(args.dir, Path(run_root))
        with tempfile.TemporaryDirectory() as run_root:  # what four processes cost with next to no experts
            from models.default_model import ensure_default_checkpoint

            results["startup_embedded_default_72MB_experts"] = measure_startup(ensure_default_checkpoint(),
                                                                               Path(run_root))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
