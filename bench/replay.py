"""Replay a routing trace through the runtime's own cache code against a model of the device: every policy, the
Belady floor, at full scale, in seconds, with the same numbers on every run.

    python bench/replay.py --trace ../shared/traces/deepseek-v2-lite-routing.npz [--train-fraction 0.5]
        [--cache-fractions 0.125,0.25,0.5] [--link-gbps 25] [--compute-ms-per-layer 0.5] [--expert-mb 17.3]
        [--lookahead 2] [--prompts N] [--host-compute never|auto|always[,...]] [--host-gbps 40]
        [--host-overhead-ms 0.05] [--predictions CACHE.npz] [--json OUT] [--plot OUT.png]

The trace is the format of ``../shared/traces`` (``experts [N, L, k]``, ``token_ids``, ``prompt_offsets``; see its
README). Prompts before ``--train-fraction`` train the predictor; everything is scored on the rest, served back to
back on one cache (a prompt is one request, its tokens are decode steps). The device model and what it leaves out:
``bench/replay_model.py``. Defaults describe one workstation: an RTX 4090-class GPU on PCIe 4.0 x16 (about 25 GB/s
for pinned host-to-device copies) and 0.5 ms per MoE layer of a decode step (README, "Replay").

Rows (JSON: a list): ``policy`` (``lru``, ``lfu``, ``ondemand``, ``promoe``, ``belady``), ``cache_fraction``,
``cache_experts``, ``hit_rate``, ``bytes_per_token``, ``stall_ms_per_token``, ``tpot_ms``, ``floor_tpot_ms`` and,
for ``promoe``, ``precision``, ``fetch_rate``, ``goodpred``. ``belady`` is optimal replacement with perfect
prefetch: its TPOT is the floor ``max(t_all_resident, B / W)`` (DESIGN.md section 7).

``--host-compute`` (one or several of ``never``, ``auto``, ``always``; every policy runs with each): a missing expert
may be computed on the host CPU, at ``--host-gbps`` of weights read plus ``--host-overhead-ms`` per call, chosen by
the runtime's own cost model (``coordinator/host_compute.py``) from what it measured so far. Rows gain
``host_compute``, ``host_experts_per_token``, ``host_ms_per_token`` (host time spent) and
``host_predicted_ms_per_token`` (what the cost model expected it to be). The floor stays the device-only one: with
host compute a policy can go below it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.belady import belady_misses
from bench.replay_model import DeviceProfile, HostProfile, ReplayModel
from coordinator.host_compute import HOST_COMPUTE_MODES

log = logging.getLogger(__name__)

POLICIES = ("lru", "lfu", "ondemand", "promoe")


@dataclass(frozen=True)
class Trace:
    experts: np.ndarray  # [N, L, k] local expert ids
    token_ids: np.ndarray  # [N]
    prompt_offsets: np.ndarray  # [P+1]
    experts_per_layer: int

    @classmethod
    def load(cls, path: Path, prompts: int | None = None) -> Trace:
        data = np.load(path)
        offsets = data["prompt_offsets"].astype(np.int64)
        if prompts is not None:
            offsets = offsets[: prompts + 1]
        end = int(offsets[-1])
        experts = data["experts"][:end]
        per_layer = int(data["experts_per_layer"]) if "experts_per_layer" in data else int(experts.max()) + 1
        return cls(experts, data["token_ids"][:end].astype(np.int64), offsets, per_layer)

    def split(self, train_fraction: float) -> tuple[Trace, Trace]:
        """The first ``train_fraction`` of the prompts, and the rest (offsets rebased to 0)."""
        n_prompts = len(self.prompt_offsets) - 1
        cut = round(n_prompts * train_fraction)
        if not 0 < cut < n_prompts:
            raise ValueError(f"--train-fraction {train_fraction} leaves no prompt to train on or to score")
        at = int(self.prompt_offsets[cut])
        train = Trace(self.experts[:at], self.token_ids[:at], self.prompt_offsets[: cut + 1], self.experts_per_layer)
        rest = self.prompt_offsets[cut:] - at
        return train, Trace(self.experts[at:], self.token_ids[at:], rest, self.experts_per_layer)

    def fingerprint(self) -> str:
        """A short digest of the routing, the tokens and the prompt boundaries."""
        h = hashlib.sha256()
        for a in (self.experts, self.token_ids, self.prompt_offsets):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    @property
    def n_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    def global_accesses(self) -> list[list[int]]:
        """One access per (token, layer): the global ids of the experts its gate chose."""
        base = np.arange(self.n_layers, dtype=np.int64)[None, :, None] * self.experts_per_layer
        return (self.experts.astype(np.int64) + base).reshape(-1, self.top_k).tolist()


@dataclass(frozen=True)
class Config:
    policy: str
    cache_fraction: float
    profile: DeviceProfile
    lookahead: tuple[int, ...]
    outlook: bool = True
    """Give promoe the predictor's outlook for every expert one token on (eviction estimates)."""
    host_compute: str = "never"
    """``never``, ``auto`` or ``always``: whether missing experts may be computed on the host."""


@dataclass(frozen=True)
class Predicted:
    top: dict[int, tuple[np.ndarray, np.ndarray]]
    """Per distance ``d``: ``[N, L, k]`` local experts predicted for the layer ``d`` ahead of each (token, layer),
    best first, and ``[N, L, k]`` their probabilities."""
    outlook: np.ndarray
    """``[N, L, E]`` float16: at each (token, layer), the probability of every expert of that layer at its gate one
    token on (distance ``L``). (Outlooks at the lookahead's distances too measured no better on the DeepSeek trace:
    1.169x lru against 1.171x, link-bound at 12.5%.)"""


def predictions_for(train: Trace, test: Trace, distances: tuple[int, ...], **fit_options: Any) -> Predicted:
    """What the routing predictor trained on ``train`` (from what a runtime knows: token ids and gate decisions)
    predicts on ``test``; ``fit_options`` go to ``RoutingPredictor.fit`` (its defaults suit a real trace)."""
    from training.routing_predictor import RoutingPredictor

    started = time.perf_counter()
    predictor = RoutingPredictor.fit(train.experts, train.token_ids, train.prompt_offsets, train.experts_per_layer,
                                     distances=tuple(sorted({1, 2, 3, test.n_layers, *distances})), **fit_options)
    top: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for d in distances:
        probs = predictor.probabilities(test.experts, test.token_ids, test.prompt_offsets, d)  # [N, L, E]
        best = np.argsort(-probs, axis=-1, kind="stable")[..., : test.top_k]  # [N, L, k]
        top[d] = best.astype(np.int16), np.take_along_axis(probs, best, axis=-1).astype(np.float32)
    outlook = predictor.probabilities(test.experts, test.token_ids, test.prompt_offsets, test.n_layers)
    log.info("routing predictor: fit and predict in %.1f s", time.perf_counter() - started)
    return Predicted(top, outlook.astype(np.float16))


def cached_predictions(path: Path, key: str, make: Callable[[], Predicted]) -> Predicted:
    """``make()``'s predictions, kept in ``path`` under ``key`` (the trace, its split and the distances): fitting
    the routing predictor takes tens of minutes on two cores, replaying it seconds to minutes, so experiments with
    the policy fit once. A file made for another key is refitted and overwritten."""
    if path.exists():
        with np.load(path) as z:
            if str(z["key"]) == key:
                top = {int(d): (z[f"experts_{d}"], z[f"probabilities_{d}"]) for d in z["distances"]}
                log.info("routing predictor: predictions read from %s", path)
                return Predicted(top, z["outlook"])
        log.info("routing predictor: %s holds predictions for another trace or split; fitting again", path)
    predicted = make()
    arrays: dict[str, Any] = {"key": np.array(key), "distances": np.array(sorted(predicted.top)),
                              "outlook": predicted.outlook}
    for d, (experts, probabilities) in predicted.top.items():
        arrays[f"experts_{d}"], arrays[f"probabilities_{d}"] = experts, probabilities
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return predicted


def oracle_predictions(test: Trace, distances: tuple[int, ...]) -> Predicted:
    """The experts the target gates will really choose, with probability 1: the ceiling of any predictor at these
    distances (a prediction past a prompt's last token names that token's own layer again, and is never scored)."""
    n, n_layers, _ = test.experts.shape
    def chosen(d: int) -> np.ndarray:
        """``[N, L, k]`` what the gate ``d`` layers after each (token, layer) chose."""
        ahead = np.arange(n_layers)[None, :] + d  # [1, L]
        t = np.minimum(np.arange(n)[:, None] + ahead // n_layers, n - 1)  # [N, L]
        return test.experts[t, ahead % n_layers].astype(np.int64)

    top = {d: (chosen(d).astype(np.int16), np.ones((n, n_layers, test.top_k), dtype=np.float32)) for d in distances}
    outlook = np.zeros((n, n_layers, test.experts_per_layer), dtype=np.float16)
    np.put_along_axis(outlook, chosen(n_layers), 1.0, axis=-1)
    return Predicted(top, outlook)


def run_config(config: Config, test: Trace, predicted: Predicted | None) -> dict:
    """One row: ``config.policy`` on the scored part of the trace."""
    n_experts = test.n_layers * test.experts_per_layer
    n_slots = max(test.top_k, round(config.cache_fraction * n_experts))
    predict = outlook = None
    if predicted is not None:
        def predict(t: int, layer: int, distance: int) -> tuple[list[int], list[float]]:
            experts, probabilities = predicted.top[distance]
            return experts[t, layer].tolist(), probabilities[t, layer].tolist()

        if config.outlook:
            def outlook(t: int, layer: int) -> np.ndarray:
                return predicted.outlook[t, layer].astype(np.float64)
    model = ReplayModel(config.policy, n_slots, test.n_layers, test.experts_per_layer, test.top_k,
                        config.profile, lookahead=config.lookahead, predict=predict, outlook=outlook,
                        host_compute=config.host_compute)
    result = model.run(test.experts, test.prompt_offsets.tolist())
    row = {
        "policy": config.policy, "cache_fraction": config.cache_fraction, "cache_experts": n_slots,
        "hit_rate": result.hits / result.uses, "bytes_per_token": result.link_bytes / result.tokens,
        "stall_ms_per_token": result.stall_ms / result.tokens, "tpot_ms": result.time_ms / result.tokens,
        "host_compute": config.host_compute, "host_experts_per_token": result.host_experts / result.tokens,
        "host_ms_per_token": result.host_ms / result.tokens,
        "host_predicted_ms_per_token": result.host_predicted_ms / result.tokens,
    }
    if model.cache.policy.prefetches:  # None without a predictor
        precision = result.predicted_chosen / result.predicted if result.predicted else None
        fetch_rate = result.predicted_ready / result.predicted if result.predicted else None
        goodpred = precision * fetch_rate if precision is not None and fetch_rate is not None else None
        row.update(precision=precision, fetch_rate=fetch_rate, goodpred=goodpred)
    return row


def belady_row(config: Config, test: Trace, accesses: list[list[int]]) -> dict:
    """Optimal replacement with perfect prefetch: only its misses cross the link, entirely behind compute."""
    n_experts = test.n_layers * test.experts_per_layer
    n_slots = max(test.top_k, round(config.cache_fraction * n_experts))
    misses = belady_misses(accesses, n_slots)
    tokens = len(test.experts)
    p = config.profile
    bytes_per_token = misses * p.expert_nbytes / tokens
    floor = max(test.n_layers * p.compute_ms, bytes_per_token / (p.link_gbps * 1e6))
    return {"policy": "belady", "cache_fraction": config.cache_fraction, "cache_experts": n_slots,
            "hit_rate": 1 - misses / len(accesses) / test.top_k, "bytes_per_token": bytes_per_token,
            "stall_ms_per_token": floor - test.n_layers * p.compute_ms, "tpot_ms": floor, "floor_tpot_ms": floor}


def replay(trace: Trace, train_fraction: float, fractions: list[float], profile: DeviceProfile,
           lookahead: tuple[int, ...],
           policies: tuple[str, ...] = POLICIES, jobs: int = 1, predictor: str = "routing",
           fit_options: dict[str, Any] | None = None, host_compute: tuple[str, ...] = ("never",),
           predictions: Path | None = None) -> list[dict]:
    train, test = trace.split(train_fraction)
    predicted = None
    if "promoe" in policies and predictor == "oracle":
        predicted = oracle_predictions(test, lookahead)
    elif "promoe" in policies and predictor == "routing":
        def fit() -> Predicted:
            return predictions_for(train, test, lookahead, **(fit_options or {}))

        key = (f"{trace.fingerprint()} train {len(train.prompt_offsets) - 1} test {len(test.prompt_offsets) - 1} "
               f"distances {sorted(set(lookahead))} fit {sorted((fit_options or {}).items())}")
        predicted = fit() if predictions is None else cached_predictions(predictions, key, fit)
    accesses = test.global_accesses()
    rows: list[dict] = []
    configs = [Config(policy, f, profile, lookahead, host_compute=mode)
               for f in fractions for mode in host_compute for policy in policies]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            futures = [pool.submit(run_config, c, test, predicted if c.policy == "promoe" else None)
                       for c in configs]
            done = [f.result() for f in futures]
    else:
        done = [run_config(c, test, predicted if c.policy == "promoe" else None) for c in configs]
    for fraction in fractions:
        floor = belady_row(Config("belady", fraction, profile, lookahead), test, accesses)
        for row in done:
            if row["cache_fraction"] == fraction:
                rows.append({**row, "floor_tpot_ms": floor["tpot_ms"]})
        rows.append(floor)
    return rows


def _opt(row: dict, key: str) -> str:
    return f"{row[key]:6.3f}" if row.get(key) is not None else f"{'-':>6}"


def format_table(rows: list[dict]) -> str:
    head = (f"{'policy':10} {'host':>6} {'cache':>6} {'experts':>7} {'hit':>6} {'MB/token':>9} {'stall ms':>9} "
            f"{'TPOT ms':>8} {'x floor':>8} {'x lru':>6} {'prec':>6} {'fetch':>6} {'GoodPred':>8} {'host/tok':>8}")
    lines = [head]
    lru = {r["cache_fraction"]: r["tpot_ms"] for r in rows
           if r["policy"] == "lru" and r.get("host_compute", "never") == "never"}
    for r in rows:
        vs_lru = f"{lru[r['cache_fraction']] / r['tpot_ms']:6.2f}" if r["cache_fraction"] in lru else f"{'-':>6}"
        host = f"{r['host_experts_per_token']:8.2f}" if "host_experts_per_token" in r else f"{'-':>8}"
        lines.append(
            f"{r['policy']:10} {r.get('host_compute', '-'):>6} {r['cache_fraction']:6.3f} {r['cache_experts']:7d} "
            f"{r['hit_rate']:6.3f} {r['bytes_per_token'] / 1e6:9.1f} {r['stall_ms_per_token']:9.2f} "
            f"{r['tpot_ms']:8.2f} {r['tpot_ms'] / r['floor_tpot_ms']:8.2f} {vs_lru} {_opt(r, 'precision')} "
            f"{_opt(r, 'fetch_rate')} {_opt(r, 'goodpred'):>8} {host}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    modes = list(dict.fromkeys(r.get("host_compute", "never") for r in rows if r["policy"] != "belady"))
    for policy in [*POLICIES, "belady"]:
        for mode in modes if policy != "belady" else ["never"]:
            pts = sorted((r["cache_fraction"], r["tpot_ms"]) for r in rows
                         if r["policy"] == policy and r.get("host_compute", "never") == mode)
            label = "belady (floor)" if policy == "belady" else policy if mode == "never" else f"{policy}, host {mode}"
            if pts:
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o",
                        linestyle="-" if mode == "never" else "--", label=label)
    ax.set_xlabel("cache (% of experts)")
    ax.set_ylabel("TPOT (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, required=True, help="routing trace (.npz, the format of ../shared/traces)")
    p.add_argument("--train-fraction", type=float, default=0.5, help="share of the prompts the predictor trains on")
    p.add_argument("--cache-fractions", default="0.125,0.25,0.5", help="cache sizes as shares of all experts")
    p.add_argument("--link-gbps", type=float, default=25.0, help="host-to-device link, GB/s (PCIe 4.0 x16 pinned)")
    p.add_argument("--compute-ms-per-layer", type=float, default=0.5,
                   help="one MoE layer of a decode step with every expert resident, ms")
    p.add_argument("--expert-mb", type=float, default=17.3, help="one expert's size over the link, MB (17.3: bf16)")
    p.add_argument("--chunks-per-expert", type=int, default=3, help="the loader's unit of copying and preemption")
    p.add_argument("--lookahead", default="2",
                   help="the predictor targets the MoE layer this far ahead (comma-separated: several predictions "
                        "per gate, one per distance)")
    p.add_argument("--prompts", type=int, default=None, help="use only the first N prompts of the trace")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of " + ",".join(POLICIES))
    p.add_argument("--predictor", choices=("routing", "none", "oracle"), default="routing",
                   help="promoe's predictor: the routing predictor (training/routing_predictor.py) trained on the "
                        "first part of the trace; none (prediction-aware eviction alone, no prefetching); or oracle "
                        "(the trace's own future: what a perfect predictor at this lookahead would give)")
    p.add_argument("--jobs", type=int, default=0,
                   help="configurations replayed in parallel processes (0: one per CPU core); numbers do not depend "
                        "on it")
    p.add_argument("--host-compute", default="never",
                   help="comma-separated subset of " + ",".join(HOST_COMPUTE_MODES) + ": may missing experts be "
                        "computed on the host (auto: when the runtime's cost model expects it sooner); each policy "
                        "runs with each")
    p.add_argument("--host-gbps", type=float, default=HostProfile.gbps,
                   help="expert weights the host CPU reads per second computing one expert for a token, GB/s "
                        "(40: a dual-channel DDR5 desktop, README 'Host compute')")
    p.add_argument("--host-overhead-ms", type=float, default=HostProfile.overhead_ms,
                   help="per host computation: hidden states in, threads woken, output out, ms")
    p.add_argument("--predictions", type=Path, default=None,
                   help="keep the routing predictor's predictions in this .npz and reuse them while the trace, its "
                        "split and the lookahead stay the same (the fit is the slow part)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--plot", type=Path, default=None, help="TPOT against cache size per policy (PNG)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    trace = Trace.load(args.trace, args.prompts)
    profile = DeviceProfile(link_gbps=args.link_gbps, compute_ms=args.compute_ms_per_layer,
                            expert_nbytes=round(args.expert_mb * 1e6), n_chunks=args.chunks_per_expert,
                            host=HostProfile(gbps=args.host_gbps, overhead_ms=args.host_overhead_ms))
    fractions = [float(x) for x in args.cache_fractions.split(",")]
    policies = tuple(x for x in args.policies.split(",") if x)
    started = time.perf_counter()
    host_compute = tuple(x for x in args.host_compute.split(",") if x)
    if not set(host_compute) <= set(HOST_COMPUTE_MODES):
        p.error(f"--host-compute: each of {','.join(HOST_COMPUTE_MODES)}")
    jobs = args.jobs or min(os.cpu_count() or 1, len(fractions) * len(policies) * len(host_compute))
    lookahead = tuple(int(x) for x in args.lookahead.split(","))
    rows = replay(trace, args.train_fraction, fractions, profile, lookahead, policies, jobs, args.predictor,
                  host_compute=host_compute, predictions=args.predictions)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    title = (f"{args.trace.name}: link {args.link_gbps:g} GB/s, {args.compute_ms_per_layer:g} ms/layer, "
             f"experts {args.expert_mb:g} MB")
    if host_compute != ("never",):
        title += f", host {args.host_gbps:g} GB/s + {args.host_overhead_ms:g} ms/call"
    if args.plot is not None:
        plot(rows, args.plot, title)
    print(f"{title}; replayed in {time.perf_counter() - started:.0f} s")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
