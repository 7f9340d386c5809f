"""promoe: serve a Mixture-of-Experts model with its experts offloaded to host memory.

    python launch.py --model qwen-moe --prompt "def fib(n):" --max-new-tokens 32     # one shot
    python launch.py --model qwen-moe                                                # serve on tcp://127.0.0.1:5555
    python launch.py --connect tcp://127.0.0.1:5555 --prompt "hello"                 # ask a running server
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import uuid
from pathlib import Path

log = logging.getLogger("promoe")

DEFAULT_BIND = "tcp://127.0.0.1:5555"
DEFAULT_MAX_BATCH = 16
"""Requests run together by default, fewer where their keys and values do not fit (``workers/kv_memory.py``): on the
CPU stand-in 16 clients got 3.2x the tokens/s of one at a time (median of four pairs; README, "Continuous
batching")."""
JSON_FIELDS = ("ttft_ms", "tpot_ms", "hit_rate", "stall_ms", "experts_loaded", "bytes_loaded",
               "prefetch_precision", "prefetch_recall", "goodpred")


def build_parser() -> argparse.ArgumentParser:
    from models.registry import MODEL_NAMES
    from protocol.config import POLICIES

    p = argparse.ArgumentParser(prog="launch.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="qwen-moe", choices=tuple(MODEL_NAMES),
                     help="model name, looked up in the local Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub, "
                          "~/.cache/huggingface/hub), chat/instruct first; qwen-moe falls back to the embedded "
                          "default when none is found")
    src.add_argument("--model-path", type=Path, help="a local Hugging Face checkpoint directory "
                                                     "(qwen2_moe, qwen3_moe, mixtral, deepseek_v2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype on CPU (default float32); experts stay in the checkpoint's dtype in host "
                        "memory")
    p.add_argument("--expert-dtype", choices=("bf16", "fp16", "fp32", "int8", "int4"), default=None,
                   help="routed experts' dtype in the store, slots and link (default: the checkpoint's); int8/int4: "
                        "group-wise symmetric weight-only quantization (README, Quantized experts)")
    p.add_argument("--quant-group-size", type=int, default=64,
                   help="weights per int8/int4 scale, along the input dim (default 64)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where the model runs and the cache slots live (default: cuda if available, else cpu)")
    p.add_argument("--policy", choices=POLICIES, default="promoe", help="cache policy (default promoe)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--cache-experts", type=int, help="cache slots, from one layer's top-k to all experts "
                                                        "(default: a quarter of all experts)")
    size.add_argument("--cache-gb", type=float, help="cache size in GB of slot memory")
    p.add_argument("--chunks-per-expert", type=int, default=3, help="chunks per expert copy (default 3)")
    p.add_argument("--link-gbps", type=float, default=None,
                   help="emulated host-to-device bandwidth in GB/s on the CPU path (default: unpaced memcpy)")
    p.add_argument("--host-compute", choices=("auto", "never", "always"), default="auto",
                   help="compute a missing expert of a decode step on the host when that is faster than copying it "
                        "(auto, the default: by the measured cost model; always: every miss; never)")
    p.add_argument("--host-max-tokens", type=int, default=4,
                   help="largest step, in tokens, whose experts may be computed on the host (default 4; prefill "
                        "always loads)")
    p.add_argument("--lookahead", type=int, default=2, help="layers ahead the predictor targets (default 2)")
    p.add_argument("--no-early-preemption", action="store_true",
                   help="ablation: never preempt or reorder speculative loads")
    p.add_argument("--no-reordered-inference", action="store_true",
                   help="ablation: compute experts in ascending order, waiting for each, instead of as they land")
    p.add_argument("--predictor", type=Path, default=None,
                   help="trained predictor file (from --train-predictor); without it, skip-layer gate reuse")
    p.add_argument("--routing-predictor", type=Path, metavar="FILE", default=None,
                   help="predict from the gates' routing and the token ids with this routing predictor (.npz, from "
                        "python -m training.routing_fit on a --record-trace file) instead of hidden states; it also "
                        "ranks resident experts for promoe's eviction")
    p.add_argument("--train-predictor", type=Path, metavar="OUT", default=None,
                   help="trace the model over a corpus, train the predictor, print its accuracy table, write OUT")
    p.add_argument("--corpus", type=Path, default=None,
                   help="text file for --train-predictor (default: the Python standard library's sources)")
    p.add_argument("--train-tokens", type=int, default=24_576, help="corpus tokens traced by --train-predictor")
    p.add_argument("--record-trace", type=Path, metavar="FILE", default=None,
                   help="write every request's routing to FILE (.npz, the format of ../shared/traces, rewritten "
                        "after each request), for bench/replay.py and bench/predictors.py")
    p.add_argument("--record-hidden", action="store_true",
                   help="with --record-trace: also each MoE layer's input (float16), for hidden-state predictors")
    p.add_argument("--stand-in-cores", action="store_true",
                   help="CPU only: the inference worker alone on one core, every other process on the rest (the "
                        "CPU stand-in's model of a GPU, as bench/offload.py runs it)")
    p.add_argument("--compute-threads", type=int, default=None, metavar="N",
                   help="CPU only: torch threads of the inference worker (default: torch's, at most one fewer than "
                        "the cores and at least one, so the loader, predictor and coordinator keep a core)")
    p.add_argument("--bind", default=None,
                   help=f"client socket address (default {DEFAULT_BIND} when serving; a private ipc:// "
                        "socket in one-shot mode)")
    p.add_argument("--connect", metavar="ADDR", default=None,
                   help="send the one-shot request to a runtime already serving at ADDR")
    p.add_argument("--curve-keys", type=Path, metavar="DIR", default=None,
                   help="ZeroMQ CURVE: serving, the server keypair and DIR/authorized_clients/*.key (only those "
                        "clients are served); with --connect, DIR/client.key_secret and DIR/server.key")
    p.add_argument("--make-curve-keys", type=Path, metavar="DIR", default=None,
                   help="write a server and a client keypair into DIR, authorise the client, and exit")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --bind without CURVE keys (anyone who reaches it is served)")
    p.add_argument("--http", metavar="HOST:PORT", default=None,
                   help="also serve the OpenAI-compatible HTTP API here (a gateway process, promoe::gateway); "
                        "a non-loopback host needs --api-key or --insecure")
    p.add_argument("--api-key", default=None,
                   help="bearer token every HTTP request must carry (Authorization: Bearer KEY)")
    p.add_argument("--http-max-inflight", type=int, default=None, metavar="N",
                   help="with --http: generate requests the gateway holds at once; past it, 429 at once "
                        "(default: --max-queue + 1)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting behind the running ones; past it, new ones get a 'busy' error (default 64)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="requests decoded together, a token each per step (continuous batching), as many as their "
                        f"keys and values fit in memory up to this (default {DEFAULT_MAX_BATCH}); 1: one at a time "
                        "with generate()")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="with --max-batch > 1: prompt tokens prefilled per step between the batch's decode steps "
                        "(default 128)")
    p.add_argument("--request-timeout-s", type=float, default=None,
                   help="deadline of every request from its arrival, queued or running (default: none); "
                        "a request's own deadline_s may only be shorter")
    p.add_argument("--profile", type=Path, metavar="DIR", default=None,
                   help="run every process under py-spy; one speedscope profile per role lands in DIR")
    p.add_argument("--prompt", help="one-shot mode: prompt text")
    p.add_argument("--prompt-ids", help="one-shot mode: comma-separated token ids")
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as a user turn in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object with the result and its metrics")
    p.add_argument("--ready-timeout-s", type=float, default=180.0, help="deadline for every process to start")
    p.add_argument("--load-timeout-s", type=float, default=60.0,
                   help="the most a request may wait for experts in all (its layers' and tokens' waits added "
                        "up) before it fails (default 60)")
    p.add_argument("--run-root", type=Path, default=None,
                   help="where the run directory (ipc:// sockets, runtime.json) is made (default: $TMPDIR)")
    p.add_argument("--heartbeat-timeout-s", type=float, default=90.0,
                   help="kill and restart a worker that answers no ping this long (default 90); the inference "
                        "worker answers pings between tokens and at every layer, also while it waits for experts")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, how long accepted requests may take to finish (default 30)")
    p.add_argument("--log-level", default="INFO")
    return p


def resolve_checkpoint(args: argparse.Namespace) -> Path:
    from models.default_model import ensure_default_checkpoint
    from models.registry import ModelNotFound, resolve_model

    if args.model_path is not None:
        return args.model_path
    try:
        return resolve_model(args.model, default=ensure_default_checkpoint)
    except ModelNotFound as exc:
        raise SystemExit(str(exc)) from None


def cache_slots(args: argparse.Namespace, n_experts: int, top_k: int, slot_nbytes: int) -> int:
    if args.cache_experts is not None:
        n = args.cache_experts
    elif args.cache_gb is not None:
        n = math.floor(args.cache_gb * 1e9 / slot_nbytes)
    else:
        n = max(top_k, n_experts // 4)
    if not top_k <= n <= n_experts:
        raise SystemExit(f"--cache-experts {n} is outside {top_k} (one layer's top-k) .. {n_experts} (all experts)")
    return n


def resolve_device(requested: str | None) -> str:
    """``--device``: cuda if available unless told otherwise (DESIGN.md section 5); cuda without a GPU is an error."""
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to this torch build (use --device cpu)")
    return requested


def make_config(args: argparse.Namespace, run_dir: Path, one_shot: bool):  # -> RuntimeConfig

    from models.checkpoint import EXPERT_DTYPES, CheckpointError, open_checkpoint
    from protocol.config import RuntimeConfig
    from shm.layout import QUANT_BITS

    device = resolve_device(args.device)
    try:
        ckpt = open_checkpoint(resolve_checkpoint(args))
        # CPU computes in --dtype (float32 by default); the GPU in the experts' stored dtype (the checkpoint's, bf16
        # for real checkpoints), so a chunk crosses the link once and lands in its slot as is (int8/int4: the
        # checkpoint's dtype, dequantized into)
        stored = EXPERT_DTYPES.get(args.expert_dtype or "", ckpt.storage_dtype())
        compute_dtype = (ckpt.storage_dtype() if stored in QUANT_BITS else stored) if device == "cuda" else args.dtype
        experts = {"expert_dtype": args.expert_dtype, "group_size": args.quant_group_size}
        probe = ckpt.layout(n_slots=ckpt.config["num_experts_per_tok"], n_chunks=args.chunks_per_expert,
                            compute_dtype=compute_dtype, **experts)
        ckpt.validate(probe)  # every shard whole, every expert and router key there: before any worker starts
    except (CheckpointError, ValueError, KeyError) as exc:
        raise SystemExit(f"cannot serve this checkpoint: {exc}") from None
    if args.predictor is not None and not args.predictor.is_file():
        raise SystemExit(f"--predictor {args.predictor}: no such file (make one with --train-predictor)")
    if args.routing_predictor is not None:
        check_routing_predictor(args, probe)
    n_slots = cache_slots(args, probe.n_experts, probe.top_k, probe.slot_nbytes)
    layout = ckpt.layout(n_slots=n_slots, n_chunks=args.chunks_per_expert, compute_dtype=compute_dtype, **experts)
    log.info("%s (%s): %d MoE layers x %d experts of %.2f MB in %s; computing in %s on %s", ckpt.path,
             ckpt.config["model_type"], len(layout.moe_layers), layout.experts_per_layer, layout.expert_nbytes / 1e6,
             layout.storage_dtype, layout.compute_dtype, device.upper())
    bind = args.bind or (f"ipc://{run_dir / 'client.sock'}" if one_shot else DEFAULT_BIND)
    return RuntimeConfig(
        run_id=uuid.uuid4().hex[:10], run_dir=str(run_dir), checkpoint=str(ckpt.path), layout=layout,
        policy=args.policy, device=device, bind=bind, link_gbps=args.link_gbps, lookahead=args.lookahead,
        predictor_path=str(args.predictor) if args.predictor else None, load_timeout_s=args.load_timeout_s,
        heartbeat_timeout_s=args.heartbeat_timeout_s,
        supervisor_pid=os.getpid(), early_preemption=not args.no_early_preemption,
        reordered_inference=not args.no_reordered_inference, max_queue=args.max_queue, max_batch=max_batch(args),
        prefill_chunk=args.prefill_chunk,
        request_timeout_s=args.request_timeout_s, vocab_size=int(ckpt.config["vocab_size"]),
        curve_keys_dir=str(args.curve_keys.resolve()) if args.curve_keys else None,
        record_trace=str(args.record_trace.resolve()) if args.record_trace else None,
        record_hidden=args.record_hidden, inference_core=stand_in_core(args.stand_in_cores, device),
        compute_threads=args.compute_threads,
        routing_predictor_path=str(args.routing_predictor.resolve()) if args.routing_predictor else None,
        http=args.http, http_api_key=args.api_key, http_max_inflight=args.http_max_inflight,
        host_compute=args.host_compute, host_max_tokens=args.host_max_tokens,
        served_model_name=args.model if args.model_path is None else Path(ckpt.path).name)


def stand_in_core(wanted: bool, device: str) -> int | None:
    """``--stand-in-cores``: the core of the inference worker (the first this process may use), or None."""
    if not wanted:
        return None
    cores = sorted(os.sched_getaffinity(0))
    if device != "cpu" or len(cores) < 2:
        raise SystemExit(f"--stand-in-cores needs the CPU device and two cores or more (device {device}, "
                         f"{len(cores)} core(s) usable)")
    return cores[0]


def check_routing_predictor(args: argparse.Namespace, layout) -> None:  # layout: ExpertLayout
    """``--routing-predictor``: a readable file made for this model's routing, not given with ``--predictor``."""
    from training.routing_predictor import RoutingPredictor

    path = args.routing_predictor
    if args.predictor is not None:
        raise SystemExit("give --predictor (hidden states) or --routing-predictor (routing), not both")
    try:
        shape = RoutingPredictor.load(path).shape
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SystemExit(f"--routing-predictor {path}: cannot read it ({exc}); make one with "
                         "python -m training.routing_fit") from None
    if (shape.n_layers, shape.experts_per_layer, shape.top_k) != (len(layout.moe_layers), layout.experts_per_layer,
                                                                  layout.top_k):
        raise SystemExit(f"--routing-predictor {path} is for {shape.n_layers} MoE layers x {shape.experts_per_layer} "
                         f"experts (top-{shape.top_k}); this model has {len(layout.moe_layers)} x "
                         f"{layout.experts_per_layer} (top-{layout.top_k})")


def max_batch(args: argparse.Namespace) -> int:
    """``--max-batch``, or its default ``DEFAULT_MAX_BATCH``."""
    return DEFAULT_MAX_BATCH if args.max_batch is None else int(args.max_batch)


def check_serving_flags(args: argparse.Namespace, bind: str) -> str | None:
    """Why the runtime must not start with these flags, or None (checked before any process starts)."""
    from coordinator.auth import KeysMissing, check_server_keys, is_loopback

    if args.max_queue < 0:
        return f"--max-queue must be >= 0, got {args.max_queue}"
    if args.max_batch is not None and args.max_batch < 1:
        return f"--max-batch must be >= 1, got {args.max_batch}"
    if args.host_max_tokens < 1:
        return f"--host-max-tokens must be >= 1, got {args.host_max_tokens}"
    if args.compute_threads is not None and args.compute_threads < 1:
        return f"--compute-threads must be >= 1, got {args.compute_threads}"
    if args.compute_threads is not None and args.stand_in_cores:
        return "give --compute-threads or --stand-in-cores, not both (--stand-in-cores computes with one thread)"
    if args.prefill_chunk < 1:
        return f"--prefill-chunk must be >= 1, got {args.prefill_chunk}"
    if args.request_timeout_s is not None and not args.request_timeout_s > 0:
        return f"--request-timeout-s must be > 0, got {args.request_timeout_s}"
    if args.http_max_inflight is not None and args.http_max_inflight < 1:
        return f"--http-max-inflight must be >= 1, got {args.http_max_inflight}"
    if args.http is not None:
        problem = check_http_flags(args)
        if problem is not None:
            return problem
    if args.curve_keys is not None:
        try:
            check_server_keys(args.curve_keys)
        except KeysMissing as exc:
            return f"--curve-keys: {exc}"
    elif not is_loopback(bind) and not args.insecure:
        return (f"refusing to bind {bind}: it is not a loopback address, and clients would be served without "
                "authentication. Give --curve-keys DIR (make keys with --make-curve-keys DIR) or, on a trusted "
                "network, --insecure")
    return None


def check_http_flags(args: argparse.Namespace) -> str | None:
    """Why ``--http`` must not be served as given, or None: the loopback-by-default rule of ``--bind``."""
    from coordinator.auth import ClientKeys, KeysMissing, is_loopback
    from workers.gateway import parse_http_address

    if args.prompt is not None or args.prompt_ids is not None:
        return "--http serves; it does not go with the one-shot --prompt/--prompt-ids"
    try:
        host, _ = parse_http_address(args.http)
    except ValueError as exc:
        return f"--http: {exc}"
    if args.api_key is not None and not args.api_key.strip():
        return "--api-key must not be empty"
    if args.curve_keys is not None:  # the gateway is a CURVE client of the coordinator: it needs client keys
        try:
            ClientKeys.load(args.curve_keys)
        except KeysMissing as exc:
            return f"--http with --curve-keys: the gateway needs a client keypair in that directory ({exc})"
    if not is_loopback(f"tcp://[{host}]:0") and args.api_key is None and not args.insecure:
        return (f"refusing to serve HTTP on {args.http}: it is not a loopback address, and clients would be served "
                "without authentication. Give --api-key KEY or, on a trusted network, --insecure")
    return None


def one_shot(args: argparse.Namespace, address: str, while_waiting=None) -> int:
    from coordinator.client import PromoeClient, RequestFailed
    from protocol.messages import TokenStreamed

    prompt_ids = None
    if args.prompt_ids is not None:
        try:
            prompt_ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise SystemExit(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    printed: list[str] = []

    def print_text(token: TokenStreamed) -> None:  # text as it completes; multi-byte characters only whole
        if token.text:
            printed.append(token.text)
            print(token.text, end="", flush=True)

    curve = None
    if args.curve_keys is not None and args.connect is not None:
        from coordinator.auth import ClientKeys, KeysMissing

        try:
            curve = ClientKeys.load(args.curve_keys)
        except KeysMissing as exc:
            raise SystemExit(f"--curve-keys: {exc}") from None
    with PromoeClient(address, curve=curve) as client:
        try:
            done = client.generate(prompt=args.prompt, prompt_ids=prompt_ids, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                   while_waiting=while_waiting, chat=args.chat,
                                   on_token=None if args.json else print_text)
        except RequestFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.json:
        out: dict[str, object] = {"token_ids": done.token_ids, "text": done.text}
        out.update({k: done.metrics.get(k) for k in JSON_FIELDS})
        out.update({k: v for k, v in done.metrics.items() if k not in out})
        print(json.dumps(out))
    else:
        shown = "".join(printed)
        if done.text is None:
            print(",".join(map(str, done.token_ids)))
        elif done.text.startswith(shown):
            print(done.text[len(shown):])
        else:  # cannot happen with a consistent tokenizer; say the whole text again rather than garble it
            print("\n" + done.text)
        m = done.metrics
        hit = m.get("hit_rate")
        print(f"[{len(done.token_ids)} tokens | TTFT {m['ttft_ms']:.1f} ms | TPOT {m['tpot_ms']:.1f} ms | "
              f"hit rate {hit if hit is None else round(hit, 3)} | stall {m['stall_ms']:.1f} ms | "
              f"{m['experts_loaded']} experts loaded ({(m['bytes_loaded'] or 0) / 1e6:.1f} MB)]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None, machine: str | None = None) -> int:
    """``machine``: the host CPU as ``platform.machine()`` names it (None: this host's; tests inject another)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s launch[%(process)d] %(levelname)s %(name)s: %(message)s")
    wants_one_shot = args.prompt is not None or args.prompt_ids is not None
    if args.make_curve_keys is not None:
        from coordinator.auth import make_keys

        for path in make_keys(args.make_curve_keys):
            print(path)
        return 0
    if args.connect is not None:
        if not wants_one_shot:
            raise SystemExit("--connect needs --prompt or --prompt-ids")
        return one_shot(args, args.connect)
    if args.train_predictor is not None:
        from training.predictor_training import TrainingConfig, format_table, train_predictor

        rows = train_predictor(resolve_checkpoint(args), args.train_predictor, args.corpus,
                               TrainingConfig(tokens=args.train_tokens))
        print("held-out top-k accuracy (share of predicted experts the gate chose):")
        print(format_table(rows))
        return 0
    from shm.ordering import UnsupportedArchitecture, require_ordered_stores

    try:
        require_ordered_stores(machine)
    except UnsupportedArchitecture as exc:
        print(f"launch.py: error: {exc}", file=sys.stderr)
        return 2
    problem = check_serving_flags(args, args.bind or DEFAULT_BIND)
    if problem is not None:
        print(f"launch.py: error: {problem}", file=sys.stderr)
        return 2
    if args.insecure and args.curve_keys is None:
        log.warning("--insecure: clients are served without authentication or encryption")

    from coordinator.supervisor import Supervisor
    from workers.bootstrap import WorkerDead

    run_dir = Path(tempfile.mkdtemp(prefix="promoe-run-", dir=args.run_root))
    cfg = make_config(args, run_dir, wants_one_shot)
    supervisor = Supervisor(cfg, profile_dir=args.profile, machine=machine)
    try:
        supervisor.start(args.ready_timeout_s)
        if wants_one_shot:
            return one_shot(args, cfg.bind, while_waiting=supervisor.check)
        if cfg.http:
            log.info("HTTP API on http://%s/v1 (OpenAI-compatible)", cfg.http)
        log.info("ready: serving on %s (Ctrl-C or SIGTERM drains and stops; twice stops at once)", cfg.bind)
        try:
            while True:
                supervisor.wait(supervisor.idle_wait_s)
        except KeyboardInterrupt:
            supervisor.drain(args.drain_timeout_s)
            return 0
    except WorkerDead as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        supervisor.shutdown("runtime stopping")


if __name__ == "__main__":
    sys.exit(main())
