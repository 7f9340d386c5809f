from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coordinator.runtime_process import RuntimeProcess
from models.default_model import DefaultModelSpec, ensure_default_checkpoint

PROMPT_TEXT = "def fibonacci(n):\n    return"
PROMPT_IDS = [35, 80, 111, 109, 111, 69, 32, 40]
NEW_TOKENS = 12
MAX_QUEUE = 2
"""--max-queue of the ``serving`` runtime."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default checkpoint, generated once per test session into a private cache."""
    return ensure_default_checkpoint(DefaultModelSpec(), root=tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny sharded save_pretrained checkpoint of every supported architecture (tests/checkpoints.py)."""
    from tests.checkpoints import ARCHITECTURES, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {arch: write_tiny_checkpoint(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def reference(checkpoint: Path) -> dict[str, list[int]]:
    """Greedy tokens of the plain transformers model (eager experts) on the same checkpoint: the oracle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, experts_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    out = {}
    for name, ids in (("text", tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]), ("ids", PROMPT_IDS)):
        prompt = torch.tensor([ids])
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                   do_sample=False)
        out[name] = generated[0, len(ids):].tolist()
    assert len(set(out["ids"])) > 3, "the oracle needs a model whose greedy output varies"
    return out


@pytest.fixture
def runtime_factory(tmp_path: Path, checkpoint: Path) -> Iterator:
    """Start runtimes with given flags; each is stopped afterwards and checked to leave nothing behind."""
    started: list[RuntimeProcess] = []

    def start(*flags: str, name: str = "rt") -> RuntimeProcess:
        rt = RuntimeProcess(tmp_path / f"{name}{len(started)}", checkpoint, *flags)
        started.append(rt)
        return rt

    yield start
    for rt in started:
        rt.stop()
        assert rt.leftovers() == [], rt.log()


@pytest.fixture
def runtime(runtime_factory) -> RuntimeProcess:
    """All four processes on ipc:// paths under tmp_path, LRU with a quarter of the experts cached."""
    return runtime_factory("--policy", "lru", "--cache-experts", "48")


class RuntimeKeeper:
    """One runtime at a time, kept while consecutive tests ask for the same checkpoint and start-up flags (sort the
    cases by them); each test then sets its policy and cache size at run time. ``configure_cache`` empties the
    cache, so every test starts cold as on a fresh runtime, at a fraction of the cost of starting one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started = 0
        self.current: tuple[tuple[Path, tuple[str, ...]], RuntimeProcess] | None = None

    def serving(self, checkpoint: Path, flags: tuple[str, ...], policy: str, cache_experts: int) -> RuntimeProcess:
        """The kept runtime of ``checkpoint`` started with ``flags`` (which must allocate at least ``cache_experts``
        slots), switched to ``policy`` on ``cache_experts`` slots."""
        key = (checkpoint, flags)
        if self.current is not None and self.current[0] != key:
            self.stop()
        if self.current is None:
            self.started += 1
            self.current = (key, RuntimeProcess(self.root / f"rt{self.started}", checkpoint, *flags))
        rt = self.current[1]
        with rt.client() as client:
            reply = client.configure_cache(policy=policy, cache_experts=cache_experts)
        assert (reply.policy, reply.cache_experts) == (policy, cache_experts)
        return rt

    def stop(self) -> None:
        if self.current is not None:
            rt = self.current[1]
            self.current = None
            rt.stop()
            assert rt.leftovers() == [], rt.log()


@pytest.fixture(scope="module")
def runtime_keeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeKeeper]:
    """Runtimes shared by consecutive tests of a module with the same start-up flags (``RuntimeKeeper``)."""
    keeper = RuntimeKeeper(tmp_path_factory.mktemp("kept"))
    yield keeper
    keeper.stop()


@pytest.fixture(scope="module")
def shared_runtime(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[RuntimeProcess]:
    """One runtime for a whole test module (tests that must leave it serving); checked clean at the end."""
    rt = RuntimeProcess(tmp_path_factory.mktemp("shared"), checkpoint, "--policy", "lru", "--cache-experts", "48")
    yield rt
    rt.stop()
    assert rt.leftovers() == [], rt.log()


@pytest.fixture(scope="session")
def serving(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[RuntimeProcess]:
    """One runtime with a small queue bound for the serving and fuzz modules, one request running at a time (their
    queue tests count on it; batching's own are tests/test_batch.py's); checked clean at the end."""
    rt = RuntimeProcess(tmp_path_factory.mktemp("serving"), checkpoint, "--policy", "lru", "--cache-experts", "48",
                        "--max-queue", str(MAX_QUEUE), "--max-batch", "1")
    yield rt
    rt.stop()
    assert rt.leftovers() == [], rt.log()
