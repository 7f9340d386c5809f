"""Load test: N concurrent clients x M requests each over loopback; every request must be answered.

    python bench/load.py --clients 32 --requests 4 --max-new-tokens 8 [--connect ADDR] [--json PATH]

Without ``--connect`` it starts a runtime (the embedded default model, ``--policy``, ``--cache-experts``, bound to
``tcp://127.0.0.1:<free port>``) and stops it afterwards. Each client is a thread with its own connection that sends
its requests one after another (a closed loop) and times each from send to final reply. A request without a final
reply within ``--timeout-s`` counts as dropped, which is a failure (exit code 1); error replies are counted by code.
Prints p50/p99 latency, requests/s and generated tokens/s over the whole run, and one JSON line.

``--http``: the runtime also serves HTTP (``--http``); the same load runs twice on it, first over ZeroMQ, then as
streaming OpenAI completions (``stream: true``, one ``httpx`` connection per client); the HTTP phase also reports the
gateway's added latency per token: per request, the time between streamed tokens as the HTTP client sees it minus
the coordinator's own TPOT for that request (from the stream's ``promoe`` metrics), the median over requests; and the
gateway process's CPU time over the HTTP phase per generated token (which the machine's other load does not inflate
the way it inflates latencies).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.client import PromoeClient, RequestFailed
from coordinator.runtime_process import RuntimeProcess
from models.default_model import ensure_default_checkpoint


@dataclass
class ClientResult:
    latencies_s: list[float] = field(default_factory=list)
    """Send-to-final-reply time of each answered request (errors included)."""
    tokens: int = 0
    added_per_token_s: list[float] = field(default_factory=list)
    """HTTP: client-side time per streamed token minus the coordinator's TPOT, per request."""
    errors: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    """Requests without a final reply within the timeout."""


def prompt(rng: random.Random, args: argparse.Namespace) -> list[int]:
    """``--prompt-tokens`` ids: random printable bytes, or (``--text-prompts``) a random window of held-out text."""
    if not args.text_prompts:
        return [rng.randrange(32, 127) for _ in range(args.prompt_tokens)]
    text = held_out_text()
    start = rng.randrange(len(text) - args.prompt_tokens)
    return list(text[start:start + args.prompt_tokens])


@functools.cache
def held_out_text() -> bytes:
    """UTF-8 bytes of the standard library's sources after the trained copy's training text (byte-level models: its
    ``corpus_tokens`` are bytes, as ``bench/quality.py`` skips them)."""
    from training.model_training import ModelTrainingConfig
    from training.predictor_training import default_corpus_text

    skip = ModelTrainingConfig().corpus_tokens
    return default_corpus_text(skip + 200_000).encode()[skip:]


def run_client(address: str, index: int, args: argparse.Namespace, result: ClientResult) -> None:
    rng = random.Random(index)
    with PromoeClient(address, timeout_s=args.timeout_s) as client:
        for _ in range(args.requests):
            prompt_ids = prompt(rng, args)
            started = time.monotonic()
            try:
                done = client.generate(prompt_ids=prompt_ids, max_new_tokens=args.max_new_tokens)
            except RequestFailed as exc:
                result.errors[exc.code] += 1
            except TimeoutError:
                result.dropped += 1
                return  # the connection may still get the late reply: do not confuse it with the next one
            else:
                result.tokens += len(done.token_ids)
            result.latencies_s.append(time.monotonic() - started)


def run_http_client(url: str, index: int, args: argparse.Namespace, result: ClientResult) -> None:
    import httpx

    rng = random.Random(index)
    with httpx.Client(timeout=args.timeout_s) as http:
        for _ in range(args.requests):
            prompt_ids = prompt(rng, args)
            body = {"prompt": prompt_ids, "max_tokens": args.max_new_tokens, "temperature": 0, "stream": True}
            started = time.monotonic()
            arrivals: list[float] = []
            extra: dict = {}
            try:
                with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
                    if reply.status_code != 200:
                        result.errors[json.loads(reply.read())["error"]["code"]] += 1
                        result.latencies_s.append(time.monotonic() - started)
                        continue
                    for line in reply.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[len("data: "):])
                        if "error" in chunk:
                            result.errors[chunk["error"]["code"]] += 1
                        elif chunk["choices"][0]["finish_reason"] is None:
                            arrivals.append(time.monotonic())
                        else:
                            extra = chunk.get("promoe") or {}
            except httpx.TimeoutException:
                result.dropped += 1
                return
            result.latencies_s.append(time.monotonic() - started)
            result.tokens += len(extra.get("token_ids", []))
            if len(arrivals) > 2 and extra.get("tpot_ms") is not None:
                client_tpot_s = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
                result.added_per_token_s.append(client_tpot_s - extra["tpot_ms"] / 1e3)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(address: str, args: argparse.Namespace, http: bool = False) -> dict[str, object]:
    results = [ClientResult() for _ in range(args.clients)]
    threads = [threading.Thread(target=run_http_client if http else run_client, args=(address, i, args, results[i]),
                                daemon=True)
               for i in range(args.clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.timeout_s * args.requests + 60)
    wall_s = time.monotonic() - started
    latencies = [x for r in results for x in r.latencies_s]
    errors: Counter[str] = sum((r.errors for r in results), Counter())
    sent = args.clients * args.requests
    dropped = sum(r.dropped for r in results) + sum(t.is_alive() for t in threads)
    answered = len(latencies)
    tokens = sum(r.tokens for r in results)
    added = [x for r in results for x in r.added_per_token_s]
    return {
        "path": "http" if http else "zeromq",
        "gateway_added_per_token_ms_p50": statistics.median(added) * 1e3 if added else None,
        "clients": args.clients, "requests_per_client": args.requests, "max_new_tokens": args.max_new_tokens,
        "prompt_tokens": args.prompt_tokens, "text_prompts": args.text_prompts, "requests": sent, "answered": answered,
        "unanswered": sent - answered, "dropped": dropped, "errors": dict(errors),
        "completed": answered - sum(errors.values()), "wall_s": wall_s,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": percentile(latencies, 0.99) if latencies else None,
        "latency_max_s": max(latencies) if latencies else None,
        "requests_per_s": answered / wall_s, "tokens_per_s": tokens / wall_s, "tokens": tokens,
    }


def free_tcp_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--text-prompts", action="store_true",
                   help="prompts are windows of held-out text (the standard library's sources past what the trained "
                        "copy read) instead of random printable bytes; byte-level models")
    p.add_argument("--timeout-s", type=float, default=600.0, help="a request unanswered after this is dropped")
    p.add_argument("--connect", metavar="ADDR", help="a runtime already serving (default: start one)")
    p.add_argument("--policy", default="lru")
    p.add_argument("--cache-experts", type=int, default=48)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--http", action="store_true",
                   help="start the runtime with --http and run the load over ZeroMQ, then as streaming HTTP")
    args = p.parse_args()
    runtime = None
    address = args.connect
    http_flags = ["--http", free_tcp_address()[len("tcp://"):]] if args.http else []
    if args.http and address is not None:
        raise SystemExit("--http starts its own runtime: leave out --connect")
    if address is None:
        root = Path(tempfile.mkdtemp(prefix="promoe-load-"))
        runtime = RuntimeProcess(root, ensure_default_checkpoint(), "--policy", args.policy, "--cache-experts",
                                 str(args.cache_experts), "--max-queue", str(args.max_queue), *http_flags,
                                 ready_timeout_s=300, address=free_tcp_address())
        address = runtime.address
    try:
        result = run(address, args)
        if runtime is not None and runtime.http is not None:
            gateway = runtime.children["gateway"]
            cpu_before = sum(gateway.cpu_times()[:2])
            result["http"] = http = run(f"http://{runtime.http}", args, http=True)
            cpu_s = sum(gateway.cpu_times()[:2]) - cpu_before
            http["gateway_cpu_s"] = cpu_s
            http["gateway_cpu_ms_per_token"] = cpu_s * 1e3 / http["tokens"] if http["tokens"] else None
        if runtime is not None:
            with runtime.client() as client:
                result["server_totals"] = client.stats()
    finally:
        if runtime is not None:
            runtime.stop()
            left = runtime.leftovers()
            if left:
                raise RuntimeError(f"the runtime left {left} behind:\n{runtime.log()}")
            shutil.rmtree(runtime.root, ignore_errors=True)
    phases = [result] + ([result["http"]] if "http" in result else [])
    for r in phases:
        print(f"{r['path']}: {r['clients']} clients x {r['requests_per_client']} requests, {args.max_new_tokens} new "
              f"tokens: {r['answered']}/{r['requests']} answered ({r['completed']} completed, errors "
              f"{r['errors'] or 'none'}, dropped {r['dropped']}) in {r['wall_s']:.1f} s")
        if r["latency_p50_s"] is not None:
            print(f"  latency p50 {r['latency_p50_s']:.2f} s, p99 {r['latency_p99_s']:.2f} s, "
                  f"max {r['latency_max_s']:.2f} s; throughput {r['requests_per_s']:.2f} requests/s, "
                  f"{r['tokens_per_s']:.1f} tokens/s")
        if r["gateway_added_per_token_ms_p50"] is not None:
            print(f"  gateway's added latency per token (p50 over requests): "
                  f"{r['gateway_added_per_token_ms_p50']:.2f} ms")
        if r.get("gateway_cpu_ms_per_token") is not None:
            print(f"  gateway's CPU time: {r['gateway_cpu_s']:.2f} s, {r['gateway_cpu_ms_per_token']:.2f} ms per "
                  "token (user + system, whole requests included)")
    print(json.dumps(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all(r["unanswered"] == 0 and r["dropped"] == 0 for r in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
