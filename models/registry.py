"""Model names (``--model``) to checkpoint directories, found in the local Hugging Face cache. Never downloads.

Where it looks, in order: ``$HF_HUB_CACHE``; else ``$HF_HOME/hub``; else ``$XDG_CACHE_HOME/huggingface/hub``; else
``~/.cache/huggingface/hub`` (huggingface_hub's own order). In that directory a repository ``ORG/NAME`` lives in
``models--ORG--NAME/snapshots/REV/``; the revision ``refs/main`` names is taken, else the newest snapshot holding a
config.json. For each name the repositories are tried in order: chat/instruct first, then base.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelName:
    """One ``--model`` name and the checkpoints that serve it."""

    name: str
    """What ``--model`` takes."""
    repos: tuple[str, ...]
    """Hugging Face repositories, preferred first."""
    architecture: str
    """transformers ``model_type``."""
    falls_back_to_default: bool = False
    """With no checkpoint found: use the embedded default instead of failing."""


MODEL_NAMES: dict[str, ModelName] = {
    m.name: m
    for m in (
        ModelName("qwen-moe", ("Qwen/Qwen1.5-MoE-A2.7B-Chat", "Qwen/Qwen1.5-MoE-A2.7B"), "qwen2_moe",
                  falls_back_to_default=True),
        ModelName("qwen2-moe", ("Qwen/Qwen2-57B-A14B-Instruct", "Qwen/Qwen2-57B-A14B"), "qwen2_moe"),
        ModelName("qwen3-moe", ("Qwen/Qwen3-30B-A3B-Instruct-2507", "Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B-Base"),
                  "qwen3_moe"),
        ModelName("mixtral", ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/Mixtral-8x7B-v0.1"), "mixtral"),
    )
}


class ModelNotFound(LookupError):
    """No checkpoint for a model name; the message lists every place searched."""


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache directory, as huggingface_hub resolves it from the environment."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def repo_dir(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def snapshot_of(repo_path: Path) -> Path | None:
    """The snapshot ``refs/main`` points to, else the most recently modified one with a config.json."""
    snapshots = repo_path / "snapshots"
    ref = repo_path / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if (candidate / "config.json").is_file():
            return candidate
    if not snapshots.is_dir():
        return None
    found = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def searched_places(name: str) -> list[Path]:
    """Where ``name`` is looked for, in order."""
    cache = hub_cache_dir()
    return [repo_dir(cache, repo) for repo in MODEL_NAMES[name].repos]


def find_checkpoint(name: str) -> Path | None:
    """The checkpoint directory of ``name`` in the local cache, or None."""
    if name not in MODEL_NAMES:
        raise ModelNotFound(f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} or --model-path DIR")
    for repo, place in zip(MODEL_NAMES[name].repos, searched_places(name), strict=True):
        snapshot = snapshot_of(place)
        if snapshot is not None:
            log.info("--model %s: using %s from %s", name, repo, snapshot)
            return snapshot
    return None


def resolve_model(name: str, default: Callable[[], Path] | None = None) -> Path:
    """``find_checkpoint``, falling back to ``default()`` for a name that allows it; else ``ModelNotFound``."""
    found = find_checkpoint(name)
    if found is not None:
        return found
    places = "\n  ".join(f"{p}/snapshots/*/config.json" for p in searched_places(name))
    if MODEL_NAMES[name].falls_back_to_default and default is not None:
        log.warning("--model %s: no checkpoint in the Hugging Face cache (looked for\n  %s\n); using the embedded "
                    "default model", name, places)
        return default()
    raise ModelNotFound(f"--model {name}: no checkpoint found; looked for\n  {places}\n(set HF_HUB_CACHE or "
                        f"HF_HOME, or pass --model-path DIR)")
