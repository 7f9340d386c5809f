"""Authentication: CURVE keys, only authorised clients served, and no unauthenticated non-loopback bind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zmq.auth

from coordinator.auth import AUTHORIZED_CLIENTS, ClientKeys, is_loopback
from coordinator.client import PromoeClient
from coordinator.runtime_process import RuntimeProcess
from tests.conftest import NEW_TOKENS, PROMPT_IDS, free_port
from tests.test_cli import launch

REFUSED_WITHIN_S = 3.0
"""An unauthorised client is expected to hear nothing; it gives up after this long."""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    done = launch("--make-curve-keys", str(directory), timeout_s=60)
    assert done.returncode == 0, done.stderr
    written = {Path(line).relative_to(directory).as_posix() for line in done.stdout.split()}
    assert written == {"server.key", "server.key_secret", "client.key", "client.key_secret",
                       f"{AUTHORIZED_CLIENTS}/client.key"}
    assert b"secret-key" not in (directory / "server.key").read_bytes()  # the public file holds no secret
    return directory


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, keys: Path) -> Iterator[RuntimeProcess]:
    """With the HTTP gateway too: it is one more CURVE client of the coordinator (the client keys of ``keys``)."""
    rt = RuntimeProcess(tmp_path_factory.mktemp("curve"), checkpoint, "--policy", "lru", "--curve-keys", str(keys),
                        "--http", f"127.0.0.1:{free_port()}", curve=ClientKeys.load(keys))
    yield rt
    rt.stop()
    assert rt.leftovers() == [], rt.log()


def test_an_authorised_client_is_served(secured, reference):
    with secured.client() as client:
        done = client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS)
    assert done.token_ids == reference["ids"]


def test_the_http_gateway_is_a_curve_client(secured, reference):
    """The coordinator serves only authorised CURVE clients (below: a plain one gets nothing), so an answer through
    the gateway means it connected with the client keys."""
    body = {"prompt": PROMPT_IDS, "max_tokens": NEW_TOKENS, "temperature": 0}
    with httpx.Client(timeout=120) as http:
        done = http.post(f"http://{secured.http}/v1/completions", json=body)
        health = http.get(f"http://{secured.http}/health")
    assert done.status_code == 200, done.text
    assert done.json()["promoe"]["token_ids"] == reference["ids"]
    assert health.status_code == 200 and health.json()["coordinator"] is True


def test_connect_with_curve_keys(secured, keys, reference):
    ids = ",".join(map(str, PROMPT_IDS))
    done = launch("--connect", secured.address, "--curve-keys", str(keys), "--prompt-ids", ids,
                  "--max-new-tokens", str(NEW_TOKENS), "--json", timeout_s=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == reference["ids"]


def test_unknown_key_and_plain_clients_get_nothing(secured, keys, tmp_path):
    public, secret = zmq.auth.create_certificates(tmp_path, "stranger")  # valid CURVE, but not authorised
    stranger = ClientKeys(zmq.auth.load_certificate(public)[0], zmq.auth.load_certificate(secret)[1] or b"",
                          ClientKeys.load(keys).server_public)
    for curve in (stranger, None):
        with PromoeClient(secured.address, timeout_s=REFUSED_WITHIN_S, curve=curve) as client:
            with pytest.raises(TimeoutError):
                client.health()
            with pytest.raises(TimeoutError):
                client.generate(prompt_ids=PROMPT_IDS, max_new_tokens=2)
    with secured.client() as client:  # and the server went on serving its authorised client
        assert client.stats()["requests_done"] >= 1


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:{port}", "tcp://*:{port}"])
def test_a_public_bind_without_keys_refuses_to_start(tmp_path, checkpoint, bind):
    done = launch("--model-path", str(checkpoint), "--run-root", str(tmp_path), "--bind",
                  bind.format(port=free_port()), timeout_s=60)
    assert done.returncode == 2
    assert "not a loopback address" in done.stderr and "--curve-keys" in done.stderr and "--insecure" in done.stderr
    assert not list(tmp_path.glob("promoe-run-*"))  # refused before anything started


def test_curve_keys_without_a_server_key_refuse_to_start(tmp_path, checkpoint):
    done = launch("--model-path", str(checkpoint), "--run-root", str(tmp_path), "--curve-keys", str(tmp_path),
                  "--prompt-ids", "1", timeout_s=60)
    assert done.returncode == 2
    assert "server.key_secret is missing" in done.stderr


def test_loopback_addresses():
    assert all(map(is_loopback, ["tcp://127.0.0.1:5555", "tcp://127.3.2.1:1", "tcp://[::1]:5555",
                                 "tcp://localhost:80", "ipc:///tmp/x.sock", "inproc://x"]))
    assert not any(map(is_loopback, ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://eth0:5555",
                                     "tcp://10.0.0.1:5555", "tcp://[::]:5555", "tcp://example.com:1"]))
