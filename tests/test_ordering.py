"""The runtime starts only on CPUs with the memory ordering its shared memory relies on (shm/ordering.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

import launch
from coordinator.supervisor import Supervisor
from protocol.config import RuntimeConfig
from shm.layout import ExpertLayout
from shm.ordering import UnsupportedArchitecture, require_ordered_stores
from shm.segment import leftover_segments

LAYOUT = ExpertLayout(moe_layers=(0,), experts_per_layer=4, top_k=2, hidden_size=8, intermediate_size=4,
                      storage_dtype="bfloat16", compute_dtype="float32", n_chunks=1, n_slots=2)


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_x86_is_accepted(machine: str) -> None:
    require_ordered_stores(machine)


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "riscv64"])
def test_a_weakly_ordered_cpu_is_refused_with_the_reason(machine: str) -> None:
    with pytest.raises(UnsupportedArchitecture) as info:
        require_ordered_stores(machine)
    assert repr(machine) in str(info.value) and "x86-64" in str(info.value)


def test_the_supervisor_refuses_before_creating_anything(tmp_path: Path) -> None:
    run_id = f"test_{uuid.uuid4().hex[:12]}"
    cfg = RuntimeConfig(run_id=run_id, run_dir=str(tmp_path / "run"), checkpoint="", layout=LAYOUT, policy="lru",
                        device="cpu", bind=f"ipc://{tmp_path}/client.sock", link_gbps=None, lookahead=2,
                        predictor_path=None, load_timeout_s=5.0, supervisor_pid=0)
    supervisor = Supervisor(cfg, machine="aarch64")
    with pytest.raises(UnsupportedArchitecture):
        supervisor.start(ready_timeout_s=5.0)
    assert supervisor.children == {} and leftover_segments(run_id) == []
    assert not (tmp_path / "run").exists()


def test_launch_exits_2_with_a_clear_error_on_aarch64(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = launch.main(["--run-root", str(tmp_path), "--prompt-ids", "1"], machine="aarch64")
    assert code == 2
    err = capsys.readouterr().err
    assert "launch.py: error:" in err and "'aarch64'" in err and "x86-64" in err
    assert not list(tmp_path.glob("promoe-run-*"))
