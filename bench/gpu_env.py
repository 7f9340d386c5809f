"""What the GPU check runs on: versions, the GPU, and whether the wheels brought along fit what is installed.

    python bench/gpu_env.py [--wheels .whl]             # print everything (bench/gpu_check.sh does this first)
    python bench/gpu_env.py --plugin-ok pytest-asyncio  # exit 0 if that carried package's needs are met

For every wheel in ``--wheels`` it reads the ``Requires-Dist`` lines (extras and other environments skipped) and
checks each against the version installed here, so that a carried package that needs a newer pytest, say, is
reported before it breaks a later step.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import platform
import sys
import zipfile
from pathlib import Path

DISTRIBUTIONS = ("torch", "transformers", "pyzmq", "msgpack", "msgspec", "numpy", "safetensors", "tokenizers",
                 "huggingface-hub", "setproctitle", "psutil", "uvloop", "pytest", "pytest-asyncio", "pytest-timeout",
                 "hypothesis", "matplotlib")
"""Whose versions are printed."""
IMPORTED = {"pyzmq": "zmq", "setproctitle": "setproctitle", "msgpack": "msgpack", "msgspec": "msgspec",
            "uvloop": "uvloop", "psutil": "psutil"}
"""Also imported (cheap, and where a carried binary wheel or a missing package would break the runtime first)."""


def installed(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def wheel_requirements(wheel: Path) -> tuple[str, list[str]]:
    """(distribution name, its Requires-Dist lines) from the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(name).decode()
    dist = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Name:"))
    return dist, [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def unmet(requirements: list[str]) -> list[str]:
    """The requirements (for this interpreter, no extras) that the installed packages do not satisfy."""
    from packaging.requirements import Requirement

    problems = []
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = installed(req.name)
        if have is None:
            problems.append(f"{req} (not installed)")
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req} (installed: {have})")
    return problems


def report(wheels: Path) -> None:
    print(f"python {platform.python_version()} ({sys.executable}), {platform.machine()}")
    for dist in DISTRIBUTIONS:
        where = ""
        if dist in IMPORTED:
            try:
                importlib.import_module(IMPORTED[dist])
                where = "imports"
            except Exception as exc:  # a broken install must be reported, not crash the report
                where = f"IMPORT FAILS: {type(exc).__name__}: {exc}"
        print(f"  {dist:16} {installed(dist) or 'MISSING':12} {where}")
    import torch

    print(f"torch CUDA build {torch.version.cuda}, available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            print(f"  cuda:{i} {props.name}, capability {props.major}.{props.minor}, {total / 2**30:.1f} GiB "
                  f"({free / 2**30:.1f} GiB free)")
    for wheel in sorted(wheels.glob("*.whl")):
        dist, requirements = wheel_requirements(wheel)
        problems = unmet(requirements)
        print(f"carried {wheel.name}: " + ("its requirements are met" if not problems else
                                           "UNMET: " + "; ".join(problems)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--wheels", type=Path, default=Path(".whl"))
    p.add_argument("--plugin-ok", metavar="DIST", help="exit 0 if DIST is installed and its requirements are met")
    args = p.parse_args()
    if args.plugin_ok:
        if installed(args.plugin_ok) is None:
            return 1
        requirements = md.requires(args.plugin_ok) or []
        return 0 if not unmet(requirements) else 1
    report(args.wheels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
