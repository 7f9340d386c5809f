"""The GPU benchmark at real expert size, within a time budget: every policy at 12.5 / 25 / 50% cache,
``all_resident``, plain transformers, the ablation, the measured link and the Belady floor, for two routing sources.

    python bench/gpu.py --out DIR [--budget-s 300]        # CUDA (bench/gpu_check.sh runs it on the GPU machine)
    python bench/gpu.py --rehearse --out DIR              # the same steps at tiny dimensions on the CPU (CI)

For each routing source (``bench.gpu_models``): build the model on the device (non-expert weights seeded, experts
synthetic), write its non-expert weights once as a checkpoint whose experts the runtime's loader generates straight
into the host store, start the runtime once with every expert's slot allocated, and measure every row by switching
the policy and the cache size with ``configure_cache`` (the store is filled and pinned once). While the runtime
starts, the reference model (plain transformers, eager experts, same device and dtype) records the oracle tokens and
the routing. Rows run most important first; a row that would end past the source's share of ``--budget-s`` is
skipped and listed. The JSON and the table are rewritten after every row, so that a run cut short keeps what it
measured; the table is printed last.

- ``synthetic``: Qwen1.5-MoE-A2.7B's shape with seeded, skewed routers; ``promoe`` uses the learned predictor trained
  here (distance 2, on ``--trace-tokens`` tokens of the reference model).
- ``trace``: DeepSeek-V2-Lite's routing replayed from ``deepseek-v2-lite-routing.npz``. ``promoe`` runs with the
  predictor chosen by ``--trace-predictor``: ``none`` (the default, labelled ``[none: gates only]``: no prefetch,
  promoe's eviction and preemption act on gate decisions only). Skip-layer gate reuse is never used here: on this
  model it would read the future exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.gpu_models import (
    DEEPSEEK_REPLAY,
    DEEPSEEK_TINY,
    QWEN,
    QWEN_TINY,
    ModelSpec,
    build_model,
    float32_copy,
    make_replay,
    set_synthetic_routers,
    write_checkpoint,
)
from bench.gpu_report import Results, finalise
from bench.gpu_rows import (
    RowConfig,
    link_bandwidth_gbps,
    measure_runtime,
    measure_transformers,
    reference_run,
    start_runtime,
)
from bench.gpu_workload import (
    RequestSizes,
    Workload,
    default_trace,
    expected_accesses,
    synthetic_workload,
    trace_routing_stats,
    trace_workload,
)
from coordinator.runtime_process import RuntimeProcess

log = logging.getLogger("bench.gpu")

SOURCES = ("synthetic", "trace")
FIRST_SOURCE_SHARE = 0.52
"""Share of the time left that the first routing source may use (its rows past it are skipped)."""
SHM_MARGIN_NBYTES = 256 << 20
"""/dev/shm must hold the host store plus this (the slot table, the hidden-state exchange, torch's files)."""
TRACE_PREDICTORS = ("none", "routing")
"""``--trace-predictor`` choices: ``none`` (gate decisions only); ``routing`` is the hook for
``training/routing_predictor.py`` (issue 11), not wired yet."""


@dataclass(frozen=True)
class Plan:
    """What one run does, from the flags."""

    device: torch.device
    """Where the model, the reference and the runtime compute."""
    specs: dict[str, ModelSpec]
    """Routing source -> its model."""
    sizes: RequestSizes
    """Requests of every row."""
    fractions: tuple[float, ...]
    """Cache fractions, most important first."""
    trace_tokens: int
    """Tokens traced to train the learned predictor."""
    window: int
    """Tokens per traced forward pass."""
    link_gbps: float
    """CPU only: the emulated link of the runtime (and the floor's ``W``)."""
    trace: Path
    """The routing trace file."""
    trace_predictor: str
    """Predictor of the trace source (``TRACE_PREDICTORS``)."""
    work: Path
    """Scratch directory: checkpoints, predictor, runtime directories."""


class Budget:
    """Wall-clock budget of the run; ``phase`` logs and records how long each step took."""

    def __init__(self, total_s: float) -> None:
        self.t0 = time.perf_counter()
        self.total_s = total_s
        self.phases: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def deadline(self) -> float:
        return self.t0 + self.total_s

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        log.info("phase %s ...", name)
        try:
            yield
        finally:
            self.phases[name] = time.perf_counter() - started
            log.info("phase %s took %.1f s (%.0f s of %.0f s used)", name, self.phases[name], self.elapsed(),
                     self.total_s)


def row_configs(source: str, fractions: tuple[float, ...], predicting: bool) -> list[RowConfig]:
    """The runtime rows, most important first (the issue's goals: promoe and lru at 25%, promoe at 50%)."""
    quarter = 0.25 if 0.25 in fractions else fractions[0]
    half = 0.5 if 0.5 in fractions and quarter != 0.5 else None
    rows = [RowConfig("all_resident", "lru", 1.0), RowConfig("promoe", "promoe", quarter, prefetch=predicting),
            RowConfig("lru", "lru", quarter)]
    if half is not None:
        rows.append(RowConfig("promoe", "promoe", half, prefetch=predicting))
    rows += [RowConfig("lru + host", "lru", quarter, host_compute="auto"),
             RowConfig("promoe + host", "promoe", quarter, prefetch=predicting, host_compute="auto")]
    rows += [RowConfig("lfu", "lfu", quarter), RowConfig("ondemand", "ondemand", quarter)]
    for fraction in [f for f in fractions if f != quarter]:
        if fraction != half:
            rows.append(RowConfig("promoe", "promoe", fraction, prefetch=predicting))
        rows += [RowConfig(p, p, fraction) for p in ("lru", "lfu", "ondemand")]
    if source == "synthetic":  # the paper's ablation, one step at a time, at 25%
        rows += [RowConfig("ablation: prefetch only", "promoe", quarter, early_preemption=False,
                           reordered_inference=False, chunked_loads=False),
                 RowConfig("ablation: + early preemption", "promoe", quarter, reordered_inference=False,
                           chunked_loads=False),
                 RowConfig("ablation: + reordering", "promoe", quarter, chunked_loads=False)]
    return rows


def check_shm(spec: ModelSpec) -> None:
    """SharedMemory only truncates: a /dev/shm too small for the store kills the loader with SIGBUS mid-fill."""
    need = spec.n_experts * spec.expert_nbytes + SHM_MARGIN_NBYTES
    free = shutil.disk_usage("/dev/shm").free
    if free < need:
        raise RuntimeError(f"/dev/shm has {free / 1e9:.1f} GB free; the host store of {spec.name} needs "
                           f"{need / 1e9:.1f} GB")


def build_source(source: str, spec: ModelSpec, plan: Plan, budget: Budget) -> tuple[Any, Workload, dict, list[str]]:
    """The model (routers set), its workload, routing figures and the runtime's flags for this source."""
    with budget.phase(f"{source}: build the model"):
        if source == "synthetic":
            workload = synthetic_workload(spec, plan.sizes)
            model = build_model(spec, plan.device)
            set_synthetic_routers(model, spec)
        else:
            workload = trace_workload(spec, plan.sizes, plan.trace)
            model = build_model(spec, plan.device)
            assert workload.replayed is not None
            make_replay(model, spec, workload.replayed)
    flags: list[str] = []
    stats: dict[str, Any]
    if source == "synthetic":
        from training.predictor_training import TrainingConfig, collect_trace, train_from_trace
        from training.routing_stats import consecutive_overlap, top_quarter_share

        with budget.phase(f"{source}: trace and train the predictor"):
            reference = model if plan.device.type == "cuda" else float32_copy(model)
            gen = torch.Generator().manual_seed(spec.seed + 1)
            ids = torch.randint(0, spec.vocab, (plan.trace_tokens,), generator=gen).tolist()
            trace = collect_trace(reference, tuple(range(spec.layers)), ids, plan.window)
            routers = torch.stack([layer.mlp.gate.weight.float().cpu() for layer in model.model.layers])
            predictor = plan.work / f"{spec.name}-predictor.safetensors"  # not in the checkpoint
            rows = train_from_trace(trace, routers, spec.top_k, predictor,
                                    TrainingConfig(tokens=plan.trace_tokens, window=plan.window, distances=(2,)))
            stats = {"topk_overlap_consecutive": consecutive_overlap(trace.chosen),
                     "top_quarter_share": top_quarter_share(trace.chosen, spec.experts),
                     "skip_layer_gate_accuracy_d2": sum(r["gate_reuse"] for r in rows) / len(rows),
                     "learned_predictor_accuracy_d2": sum(r["learned"] for r in rows) / len(rows)}
            del trace, reference
        flags += ["--predictor", str(predictor)]
    else:
        stats = {**trace_routing_stats(workload, spec.experts), "predictor": plan.trace_predictor}
    return model, workload, stats, flags


def stop_runtime(rt: RuntimeProcess, root: Path, source: str, budget: Budget, results: Results) -> None:
    """In the background: the next source builds its model meanwhile (it waits for this before its runtime starts,
    which needs the space in /dev/shm)."""
    with budget.phase(f"{source}: stop the runtime (in the background)"):
        rt.stop()
        results.keep_log(source, rt.log_path)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Prepared:
    """A routing source whose runtime is starting: its model, requests, reference tokens and routing."""

    source: str
    spec: ModelSpec
    workload: Workload
    model: Any
    reference: Any
    """What the oracle runs: the model itself on CUDA, a float32 copy on the CPU."""
    root: Path
    pending: Future[RuntimeProcess]
    tokens: list[list[int]]
    accesses: list[set[int]]
    started_s: float


def prepare_source(source: str, plan: Plan, budget: Budget, results: Results, starter: ThreadPoolExecutor
                   ) -> Prepared:
    """Build the model, write its checkpoint, start the runtime (in the background) and run the reference."""
    spec = plan.specs[source]
    if source == "trace" and plan.trace_predictor != "none":
        # TODO(issue 11): a live predictor from training/routing_predictor.py (token ids and gate decisions only);
        # until the predictor worker can load it, the trace source runs promoe without prediction.
        raise NotImplementedError(f"--trace-predictor {plan.trace_predictor}: not wired yet (issue 11)")
    model, workload, stats, flags = build_source(source, spec, plan, budget)
    results.meta["routing"][source] = stats
    with budget.phase(f"{source}: write the checkpoint"):
        checkpoint = write_checkpoint(model, spec, plan.work / spec.name)
    with budget.phase(f"{source}: wait for the last runtime to stop"):
        for stopping in results.stopping:
            stopping.result()
    check_shm(spec)
    reference = model if plan.device.type == "cuda" else float32_copy(model)
    flags += ["--policy", "lru", "--cache-experts", str(spec.n_experts), "--device", plan.device.type,
              "--lookahead", "2", "--load-timeout-s", "60", "--max-batch", "1",  # one request at a time: generate()
              "--host-compute", "auto"]  # allowed; each row sets its own mode (the policies' rows: never)
    if plan.device.type == "cpu":
        flags += ["--link-gbps", str(plan.link_gbps)]
    root = Path(tempfile.mkdtemp(prefix=f"pb-{source[:5]}-", dir="/tmp"))  # short: ipc:// paths are limited
    started_s = time.perf_counter()
    pending = start_runtime(starter, root, checkpoint, flags,
                            ready_timeout_s=max(budget.deadline() - time.perf_counter(), 30.0))
    try:
        with budget.phase(f"{source}: reference run (while the runtime starts)"):
            tokens, accesses = reference_run(reference, spec, workload)
        if workload.replayed is not None and accesses != expected_accesses(workload, spec.experts):
            raise RuntimeError("the replay model's routing differs from the trace: the construction is broken")
    except BaseException:
        with contextlib.suppress(Exception):  # a runtime that never started has stopped itself
            pending.result().stop()
        raise
    return Prepared(source, spec, workload, model, reference, root, pending, tokens, accesses, started_s)


def measure_source(prepared: Prepared, plan: Plan, budget: Budget, deadline: float, results: Results,
                   stopper: ThreadPoolExecutor) -> None:
    """Every row of one source on its runtime, then stop the runtime in the background."""
    source, spec, workload, reference = prepared.source, prepared.spec, prepared.workload, prepared.reference
    with budget.phase(f"{source}: runtime start (rest of it)"):
        rt = prepared.pending.result()
    results.meta["runtime_start_s"][source] = time.perf_counter() - prepared.started_s
    predicting = source == "synthetic"
    count_from = spec.layers * sum(r.new_tokens for r in workload.warmup)  # accesses: a prefill + a step per token
    measured_tokens = prepared.tokens[len(workload.warmup):]
    rows: list[dict[str, Any]] = []

    def record(label: str, fraction: float | None, cache_experts: int | None, row: dict[str, Any],
               predictor: str | None = None) -> None:
        row.update(routing=source, regime=source, policy=label, cache_fraction=fraction, cache_experts=cache_experts,
                   predictor=predictor)
        rows.append(row)
        log.info("%s %s @ %s: TTFT %.1f ms, TPOT %.2f ms (%.0f s)", source, label, cache_experts, row["ttft_ms"],
                 row["tpot_ms"], row["wall_s"])
        done = [dict(r) for r in rows]
        belady = finalise(done, prepared.accesses, count_from, spec.expert_nbytes, results.link_gbps, measured_tokens)
        results.update(source, done + belady)

    try:
        longest_s = 0.0
        for i, config in enumerate(row_configs(source, plan.fractions, predicting)):
            if time.perf_counter() + 1.2 * longest_s > deadline:
                results.skip(f"{source} {config.label} @ {config.cache_fraction:.3g} (budget)")
                continue
            try:
                row = measure_runtime(rt, spec, workload, config)
            except Exception as exc:  # one row failing must not lose the others
                log.exception("%s %s @ %s failed", source, config.label, config.cache_fraction)
                results.skip(f"{source} {config.label} @ {config.cache_fraction:.3g}: failed: {exc}")
                if rt.proc.poll() is not None:
                    raise RuntimeError(f"the runtime exited (code {rt.proc.returncode})") from exc
                continue
            longest_s = max(longest_s, row["wall_s"])
            predictor = None if config.policy != "promoe" else ("learned" if predicting else "none: gates only")
            record(config.label, config.cache_fraction, config.cache_experts(spec), row, predictor)
            if i == 0:
                transformers_rows(reference, workload, plan, deadline, longest_s, record, results, source)
    finally:
        results.stopping.append(stopper.submit(stop_runtime, rt, prepared.root, source, budget, results))
    prepared.model = prepared.reference = None
    gc.collect()
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()


def run_all(sources: list[str], plan: Plan, budget: Budget, results: Results, starter: ThreadPoolExecutor,
            stopper: ThreadPoolExecutor) -> list[str]:
    """Every source, one at a time (a runtime starting, filling and pinning tens of GB, would disturb another's
    measurements, and /dev/shm may not hold two stores); returns those that failed (the others still ran).
    Starting both runtimes at once was tried for the CPU rehearsal: on 2 cores it saved nothing."""
    failed = []
    for batch in [[source] for source in sources]:
        prepared: list[Prepared] = []
        for source in batch:
            try:
                prepared.append(prepare_source(source, plan, budget, results, starter))
            except Exception as exc:
                log.exception("the %s routing source failed", source)
                results.skip(f"{source}: failed: {type(exc).__name__}: {exc}")
                failed.append(source)
        for ready in prepared:
            left = budget.deadline() - time.perf_counter()
            share = FIRST_SOURCE_SHARE if ready.source == sources[0] and len(sources) > 1 else 1.0
            try:
                measure_source(ready, plan, budget, time.perf_counter() + left * share, results, stopper)
            except Exception as exc:
                log.exception("the %s routing source failed", ready.source)
                results.skip(f"{ready.source}: failed: {type(exc).__name__}: {exc}")
                failed.append(ready.source)
    return failed


def transformers_rows(reference: Any, workload: Workload, plan: Plan, deadline: float, longest_s: float,
                      record: Any, results: Results, source: str) -> None:
    """Plain transformers with every expert resident: eager (the oracle's), and grouped_mm (its default) on CUDA."""
    implementations = ["eager"] + (["grouped_mm"] if plan.device.type == "cuda" else [])
    for impl in implementations:
        if time.perf_counter() + longest_s > deadline:
            results.skip(f"{source} transformers {impl} (budget)")
            continue
        try:
            reference.set_experts_implementation(impl)
            row = measure_transformers(reference, workload)
        except Exception as exc:  # e.g. grouped_mm unavailable on this GPU: the other rows go on
            log.exception("transformers %s failed", impl)
            results.skip(f"{source} transformers {impl}: failed: {exc}")
            continue
        finally:
            reference.set_experts_implementation("eager")
        record("transformers" if impl == "eager" else f"transformers {impl}", 1.0, None, row)


def build_plan(args: argparse.Namespace) -> Plan:
    rehearse = args.rehearse
    device = torch.device("cpu" if rehearse else "cuda")
    if rehearse:
        # no per-row warm-up request on the CPU (all_resident still warms with the measured requests): CI time
        sizes = RequestSizes(prompt_tokens=4, new_tokens=4, measured=1, warmup_prompt_tokens=0, warmup_new_tokens=0)
        specs = {"synthetic": QWEN_TINY, "trace": DEEPSEEK_TINY}
    else:
        sizes = RequestSizes(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, measured=args.measured,
                             warmup_prompt_tokens=32, warmup_new_tokens=8)
        specs = {"synthetic": QWEN, "trace": DEEPSEEK_REPLAY}
    work = args.work or Path(tempfile.mkdtemp(prefix="promoe-gpu-bench-"))
    # the rehearsal leaves out 12.5%: the same code as the other fractions, a third of its rows (CI time)
    fractions = (0.25, 0.5) if rehearse else (0.125, 0.25, 0.5)
    return Plan(device=device, specs=specs, sizes=sizes, fractions=fractions,
                trace_tokens=512 if rehearse else args.trace_tokens, window=64 if rehearse else 128,
                link_gbps=args.link_gbps, trace=args.trace or default_trace(), trace_predictor=args.trace_predictor,
                work=work)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rehearse", action="store_true", help="tiny dimensions on the CPU: every step, in about a minute")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where the results go")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new one under $TMPDIR)")
    p.add_argument("--budget-s", type=float, default=300.0, help="rows that would end later are skipped")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"routing sources among {SOURCES}, in order")
    p.add_argument("--trace", type=Path, default=None, help="routing trace (default: .whl/data, then ../shared)")
    p.add_argument("--trace-predictor", choices=TRACE_PREDICTORS, default="none",
                   help="promoe's predictor for the trace source (none: gate decisions only)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--measured", type=int, default=2, help="measured requests per row")
    p.add_argument("--trace-tokens", type=int, default=4096, help="tokens traced to train the learned predictor")
    p.add_argument("--link-gbps", type=float, default=1.0, help="CPU only: the emulated link")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[bench %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    budget = Budget(args.budget_s)
    sources = [s for s in args.sources.split(",") if s]
    if not set(sources) <= set(SOURCES):
        p.error(f"sources among {SOURCES}")
    plan = build_plan(args)
    torch.set_num_threads(os.cpu_count() or 1)
    if plan.device.type == "cuda":
        with budget.phase("link bandwidth"):
            link_gbps, link_how = link_bandwidth_gbps(plan.device), "pinned host-to-device copy of 1 GiB, median of 5"
        name = torch.cuda.get_device_name(plan.device)
    else:
        link_gbps, link_how, name = plan.link_gbps, "emulated (--link-gbps)", "cpu"
    import transformers

    slug = "cpu-rehearsal" if plan.device.type == "cpu" else name.lower().replace(" ", "-")
    meta: dict[str, Any] = {
        "device": name, "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "link_gbps": link_gbps, "link_measured_by": link_how, "budget_s": args.budget_s, "skipped": [],
        "routing": {}, "runtime_start_s": {}, "requests": asdict(plan.sizes),
        "models": {s: plan.specs[s].name for s in sources}, "wall_s": 0.0}
    results = Results(args.out, slug, meta, budget, link_gbps)
    (args.out / "runtime.log").unlink(missing_ok=True)
    stopper, starter = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    try:
        failed = run_all(sources, plan, budget, results, starter, stopper)
    finally:
        starter.shutdown(wait=True)
        stopper.shutdown(wait=True)  # every runtime stopped, its log kept
        table = results.write(plot=True)
        if args.work is None:
            shutil.rmtree(plan.work, ignore_errors=True)
    print(table.read_text(), end="", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
