"""The GPU benchmark's results: ratios and the floor per row, then ``gpu-<device>.json``, the table as text (printed
last) and a PNG of TPOT against the cache fraction, one panel per routing source.

``x resident`` is TPOT over ``all_resident``'s (``ttft x res`` the same for TTFT) and ``x floor`` the generation time
over ``max(t_all_resident, B / W)`` (DESIGN.md section 7): ``B`` the bytes Belady's replacement must load for the
recorded routing of the measured requests (the warm-up's accesses warm its cache, as they warm the runtime's) at
the row's cache size, ``W`` the measured link. ``exact``: the tokens equal the reference's (plain transformers,
same weights, same device and dtype).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.offload import belady_misses

if TYPE_CHECKING:
    from bench.gpu import Budget

log = logging.getLogger(__name__)

POLICIES = ("promoe", "lru", "lfu", "ondemand")


def finalise(rows: list[dict[str, Any]], accesses: list[set[int]], count_from: int, expert_nbytes: int,
             link_gbps: float, reference: list[list[int]]) -> list[dict[str, Any]]:
    """Add ``exact``, the ratios and the floor to one routing source's rows; returns its Belady rows."""
    resident = next((r for r in rows if r["policy"] == "all_resident"), None)
    uses = sum(len(a) for a in accesses[count_from:])
    belady: dict[int, dict[str, Any]] = {}
    for row in rows:
        tokens = row.pop("tokens", None)
        row["exact"] = tokens == reference if tokens is not None else None
        if row["cache_experts"] is None:
            continue
        # all_resident is warmed with the measured requests themselves: nothing is left to load
        misses = 0 if row["policy"] == "all_resident" else belady_misses(accesses, row["cache_experts"], count_from)
        row["belady_bytes"] = misses * expert_nbytes
        if resident is not None:
            floor_ms = max(resident["time_ms"], row["belady_bytes"] / (link_gbps * 1e9) * 1e3)
            row.update(vs_all_resident=row["tpot_ms"] / resident["tpot_ms"],
                       ttft_vs_all_resident=row["ttft_ms"] / resident["ttft_ms"], vs_floor=row["time_ms"] / floor_ms)
            if row["cache_experts"] not in belady and row["policy"] in POLICIES:
                belady[row["cache_experts"]] = {
                    "routing": row["routing"], "regime": row["routing"], "policy": "belady (floor)",
                    "cache_experts": row["cache_experts"], "cache_fraction": row["cache_fraction"],
                    "hit_rate": 1 - misses / uses if uses else None, "belady_bytes": row["belady_bytes"],
                    "time_ms": floor_ms, "ttft_ms": None, "tpot_ms": None, "stall_ms": None, "goodpred": None,
                    "exact": None}
    for row in rows:
        if row["policy"].startswith("transformers") and resident is not None:
            row.update(vs_all_resident=row["tpot_ms"] / resident["tpot_ms"],
                       ttft_vs_all_resident=row["ttft_ms"] / resident["ttft_ms"])
    return [belady[k] for k in sorted(belady)]


def write_results(out: Path, slug: str, meta: dict[str, Any], rows: list[dict[str, Any]], plot: bool) -> Path:
    """JSON and table now (called after every row, so that a run cut short keeps what it measured); PNG if asked."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-{slug}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    table = out / f"gpu-{slug}.txt"
    table.write_text(format_table(rows, meta) + "\n")
    if plot:
        draw(rows, meta, out / f"gpu-{slug}.png")
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}, "
             f"link {meta['link_gbps']:.2f} GB/s ({meta['link_measured_by']}), {meta['wall_s']:.0f} s of "
             f"{meta['budget_s']:.0f} s"]
    for source, stats in meta["routing"].items():
        lines.append(f"routing {source}: " + ", ".join(f"{k} {_cell(v)}" for k, v in stats.items()))
    head = ("cache", "frac", "TTFT ms", "TPOT ms", "stall ms", "hit", "GoodPred", "ttft x res", "x resident",
            "x floor", "exact")
    lines.append(f"{'routing':10} {'policy':26}" + "".join(f" {h:>10}" for h in head))
    for r in rows:
        cells = [r.get("cache_experts"), r.get("cache_fraction"), r.get("ttft_ms"), r.get("tpot_ms"),
                 r.get("stall_ms"), r.get("hit_rate"), r.get("goodpred"), r.get("ttft_vs_all_resident"),
                 r.get("vs_all_resident"), r.get("vs_floor"), r.get("exact")]
        lines.append(f"{r['routing']:10} {r['policy']:26}" + "".join(f" {_cell(c):>10}" for c in cells))
    lines += goal_lines(rows, list(meta["routing"]))
    lines += [f"skipped: {s}" for s in meta["skipped"]]
    return "\n".join(lines)


def goal_lines(rows: list[dict[str, Any]], sources: list[str]) -> list[str]:
    """The issue's goals, per routing source: promoe vs lru at 25% (TTFT x2, TPOT x1.5), promoe at 50% within 1.5x
    of all_resident, all_resident within 1.1x of transformers."""
    lines = []
    for source in sources:
        by = {(r["policy"], r.get("cache_fraction")): r for r in rows if r["routing"] == source}
        promoe, lru = by.get(("promoe", 0.25)), by.get(("lru", 0.25))
        if promoe and lru:
            lines.append(f"goal {source}: at 25% promoe vs lru TTFT x{lru['ttft_ms'] / promoe['ttft_ms']:.2f} "
                         f"(goal >= 2), TPOT x{lru['tpot_ms'] / promoe['tpot_ms']:.2f} (goal >= 1.5)")
        hosted = by.get(("promoe + host", 0.25))
        if hosted and lru:
            lines.append(f"goal {source}: at 25% promoe + host compute vs lru TPOT "
                         f"x{lru['tpot_ms'] / hosted['tpot_ms']:.2f} (issue 16: better than either alone)")
        half = by.get(("promoe", 0.5))
        if half and half.get("vs_all_resident"):
            lines.append(f"goal {source}: promoe at 50% TPOT x{half['vs_all_resident']:.2f} all_resident "
                         "(goal <= 1.5)")
        resident, plain = by.get(("all_resident", 1.0)), by.get(("transformers", 1.0))
        if resident and plain:
            lines.append(f"goal {source}: all_resident TPOT x{resident['tpot_ms'] / plain['tpot_ms']:.2f} "
                         "transformers (goal <= 1.1)")
    return lines


def draw(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return
    sources = list(meta["routing"])
    fig, axes = plt.subplots(1, max(len(sources), 1), figsize=(6 * max(len(sources), 1), 4), squeeze=False)
    for ax, source in zip(axes[0], sources, strict=False):
        mine = [r for r in rows if r["routing"] == source and r.get("tpot_ms") is not None]
        for policy in POLICIES:
            points = sorted((r["cache_fraction"], r["tpot_ms"]) for r in mine if r["policy"] == policy)
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=policy)
        for name, style in (("all_resident", "--"), ("transformers", ":")):
            level = next((r["tpot_ms"] for r in mine if r["policy"] == name), None)
            if level is not None:
                ax.axhline(level, color="grey", linestyle=style, label=name)
        ax.set_xlabel("cache (share of all experts)")
        ax.set_ylabel("TPOT (ms)")
        ax.set_title(f"{source} routing, {meta['device']}")
        if mine:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


class Results:
    """Rows and metadata of the run, written out after every row."""

    def __init__(self, out: Path, slug: str, meta: dict[str, Any], budget: Budget, link_gbps: float) -> None:
        self.out = out
        self.slug = slug
        self.meta = meta
        self.budget = budget
        self.link_gbps = link_gbps
        self.by_source: dict[str, list[dict[str, Any]]] = {}
        self.stopping: list[Future[None]] = []
        """Runtimes being stopped in the background."""

    def update(self, source: str, rows: list[dict[str, Any]]) -> None:
        self.by_source[source] = rows
        self.write(plot=False)

    def skip(self, what: str) -> None:
        log.warning("skipped: %s", what)
        self.meta["skipped"].append(what)

    def keep_log(self, source: str, path: Path) -> None:
        """Append the runtime's log (its last 4 MB) to ``runtime.log`` in the output folder."""
        text = path.read_bytes()[-(4 << 20):] if path.is_file() else b"(no log)"
        with open(self.out / "runtime.log", "ab") as fh:
            fh.write(f"==== runtime of the {source} routing source ====\n".encode() + text + b"\n")

    def write(self, plot: bool) -> Path:
        self.meta["wall_s"] = self.budget.elapsed()
        self.meta["phases_s"] = self.budget.phases
        rows = [r for source in self.by_source.values() for r in source]
        return write_results(self.out, self.slug, self.meta, rows, plot)
