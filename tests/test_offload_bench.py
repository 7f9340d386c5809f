"""``bench/offload.py --repeat N``: one row per case from its repeated runs."""

from __future__ import annotations

from bench.offload import median_of


def test_median_of_repeated_runs_and_tokens_only_when_every_run_agrees() -> None:
    runs = [{"tpot_ms": 30.0, "goodpred": None, "tokens": [[1, 2]]},
            {"tpot_ms": 10.0, "goodpred": 0.5, "tokens": [[1, 2]]},
            {"tpot_ms": 20.0, "goodpred": 0.7, "tokens": [[1, 2]]}]
    row = median_of(runs)
    assert row == {"tpot_ms": 20.0, "goodpred": 0.6, "tokens": [[1, 2]], "runs": 3}
    runs[1]["tokens"] = [[1, 3]]
    assert median_of(runs)["tokens"] is None  # a run that generated other tokens makes the case inexact
    assert median_of([{"tpot_ms": 5.0, "goodpred": None}]) == {"tpot_ms": 5.0, "goodpred": None, "runs": 1}
