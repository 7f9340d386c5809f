"""Precision of routing predictors on a trace: the routing predictor against the simple baselines of the traces'
README, at distances 1, 2, 3.

    python bench/predictors.py --trace ../shared/traces/deepseek-v2-lite-routing.npz [--prompts 300]
        [--train-fraction 0.5] [--distances 1,2,3] [--json OUT]

Precision is the share of the true top-k of layer ``l + d`` among the k experts a predictor names at layer ``l`` of
the same token (targets past the last layer are left out, as in the README's table; the routing predictor's column
``+next`` also scores its predictions of the next token's first layers). Every predictor is built from the first
``--train-fraction`` of the prompts and scored on the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.replay import Trace
from training.routing_predictor import RoutingPredictor


def _multi_hot(experts: np.ndarray, n: int) -> np.ndarray:
    """``[..., k]`` ids -> ``[..., n]`` float32 indicators."""
    out = np.zeros((*experts.shape[:-1], n), dtype=np.float32)
    np.put_along_axis(out, experts.astype(np.int64), 1.0, axis=-1)
    return out


def _precision(scores: np.ndarray, true: np.ndarray) -> float:
    """``scores [M, E]``, ``true [M, k]`` -> share of the true experts among the k best scored."""
    k = true.shape[-1]
    top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return float((top[:, :, None] == true[:, None, :]).any(-1).mean())


def baselines(train: Trace, test: Trace, d: int) -> dict[str, float]:
    """The README's four baselines, predicting layer ``l + d`` of the same token from layer ``l``."""
    e, n_layers = train.experts_per_layer, train.n_layers
    hot_train = _multi_hot(train.experts, e)  # [N, L, E]
    popularity = hot_train.sum(0)  # [L, E]
    results: dict[str, list[float]] = {"previous token": [], "per layer": [], "per token id": [], "co-activation": []}
    vocab = int(max(train.token_ids.max(), test.token_ids.max())) + 1
    starts = np.repeat(test.prompt_offsets[:-1], np.diff(test.prompt_offsets))
    for layer in range(n_layers - d):
        j = layer + d
        true = test.experts[:, j].astype(np.int64)  # [M, k]
        prev = np.arange(len(test.experts)) - 1
        prev_scores = _multi_hot(test.experts[np.maximum(prev, 0), j], e) * (prev >= starts)[:, None]
        results["previous token"].append(_precision(prev_scores + 1e-6 * popularity[j], true))
        results["per layer"].append(_precision(np.broadcast_to(popularity[j], (len(true), e)), true))
        per_token = np.zeros((vocab, e), dtype=np.float32)
        np.add.at(per_token, train.token_ids, hot_train[:, j])
        results["per token id"].append(_precision(per_token[test.token_ids] + 1e-6 * popularity[j], true))
        co = np.einsum("na,nb->ab", hot_train[:, layer], hot_train[:, j])  # [E, E] layer l -> l + d
        results["co-activation"].append(_precision(_multi_hot(test.experts[:, layer], e) @ co, true))
    return {name: float(np.mean(v)) for name, v in results.items()}


def routing(predictor: RoutingPredictor, test: Trace, d: int) -> tuple[float, float]:
    """Precision within the token (as the baselines), and over every target including the next token's layers."""
    probs = predictor.probabilities(test.experts, test.token_ids, test.prompt_offsets, d)  # [N, L, E]
    n, n_layers = test.experts.shape[:2]
    ends = np.repeat(test.prompt_offsets[1:], np.diff(test.prompt_offsets))
    within, everything = [], []
    for layer in range(n_layers):
        ahead = layer + d
        t = np.arange(n) + ahead // n_layers
        ok = t < ends
        p = _precision(probs[ok, layer], test.experts[t[ok], ahead % n_layers].astype(np.int64))
        everything.append(p)
        if ahead < n_layers:
            within.append(p)
    return float(np.mean(within)), float(np.mean(everything))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=300, help="use the first N prompts")
    p.add_argument("--train-fraction", type=float, default=0.5)
    p.add_argument("--distances", default="1,2,3")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    train, test = Trace.load(args.trace, args.prompts).split(args.train_fraction)
    distances = tuple(int(x) for x in args.distances.split(","))
    started = time.perf_counter()
    predictor = RoutingPredictor.fit(train.experts, train.token_ids, train.prompt_offsets, train.experts_per_layer,
                                     distances=distances)
    fit_s = time.perf_counter() - started
    rows = []
    for d in distances:
        within, everything = routing(predictor, test, d)
        rows.append({"distance": d, **baselines(train, test, d), "routing predictor": within,
                     "routing predictor +next": everything})
    names = [k for k in rows[0] if k != "distance"]
    print(f"{args.trace.name}, first {args.prompts} prompts, train fraction {args.train_fraction}; "
          f"routing predictor fitted in {fit_s:.0f} s")
    print(f"{'d':>2} " + " ".join(f"{n:>24}" for n in names))
    for r in rows:
        print(f"{r['distance']:>2} " + " ".join(f"{r[n]:24.3f}" for n in names))
    if args.json is not None:
        args.json.write_text(json.dumps({"fit_s": fit_s, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
