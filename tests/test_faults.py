"""A dead process is noticed: the supervisor stops the whole runtime and nothing is left behind."""

from __future__ import annotations

import pytest

from tests.runtime import ROLES


@pytest.mark.parametrize("role", ROLES)
def test_kill_9_of_a_worker_stops_the_runtime_cleanly(runtime_factory, role):
    rt = runtime_factory("--policy", "lru", "--cache-experts", "24")
    rt.kill_worker(role)
    code = rt.wait_exit(timeout_s=30)
    assert code == 1, f"launch.py should report the dead {role} with exit code 1, got {code}"
    assert f"{role} (pid" in rt.log() and "exited with code -9" in rt.log()
    rt.assert_nothing_left()


def test_sigterm_stops_the_runtime_cleanly(runtime):
    with runtime.client() as client:
        assert client.generate(prompt_ids=[1, 2, 3], max_new_tokens=2).token_ids
    assert runtime.stop() == 0
    runtime.assert_nothing_left()
