"""ZeroMQ CURVE on the client socket: key files, the server's key check, the client's keys, and the bind rule.

A key directory made by ``python launch.py --make-curve-keys DIR`` holds::

    DIR/server.key, DIR/server.key_secret        the server keypair (the secret file stays on the server)
    DIR/client.key, DIR/client.key_secret        one client keypair (give both files to that client, with server.key)
    DIR/authorized_clients/client.key            public keys of the clients the server accepts

More clients: ``zmq.auth.create_certificates`` (or another ``--make-curve-keys``) and copy each public ``.key`` into
``authorized_clients/``; the server reads that directory once at start. A client whose key is not there completes
no handshake, so it never reaches the coordinator and gets nothing back.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

SERVER = "server"
CLIENT = "client"
AUTHORIZED_CLIENTS = "authorized_clients"
LOCAL_TRANSPORTS = ("ipc://", "inproc://")
ZAP_DOMAIN = "promoe"


class KeysMissing(ValueError):
    """A key directory without the files it needs."""


def is_loopback(address: str) -> bool:
    """Whether a ZeroMQ bind address is reachable only from this machine (ipc/inproc, or a loopback tcp host)."""
    if address.startswith(LOCAL_TRANSPORTS):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name or a host name: not provably loopback
        return False


def make_keys(directory: Path) -> list[Path]:
    """Write a server keypair, a client keypair, and authorise that client; return the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    authorized = directory / AUTHORIZED_CLIENTS
    authorized.mkdir(exist_ok=True)
    written = []
    for name in (SERVER, CLIENT):
        public, secret = zmq.auth.create_certificates(directory, name)
        written += [Path(public), Path(secret)]
    copied = Path(shutil.copy(directory / f"{CLIENT}.key", authorized / f"{CLIENT}.key"))
    return [*written, copied]


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise KeysMissing(f"{path} is missing (make keys with: python launch.py --make-curve-keys DIR)")
    public, secret_key = zmq.auth.load_certificate(path)
    if secret and secret_key is None:
        raise KeysMissing(f"{path} holds no secret key")
    return public, secret_key


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs to reach a CURVE server."""

    public: bytes
    """This client's public key (Z85), the one listed in the server's ``authorized_clients/``."""
    secret: bytes
    """This client's secret key (Z85)."""
    server_public: bytes
    """The server's public key (Z85)."""

    @classmethod
    def load(cls, directory: Path, name: str = CLIENT) -> ClientKeys:
        """``name.key_secret`` and ``server.key`` from ``directory``."""
        public, secret = _load(directory / f"{name}.key_secret", secret=True)
        server_public, _ = _load(directory / f"{SERVER}.key", secret=False)
        assert secret is not None
        return cls(public, secret, server_public)

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` (before it connects) a CURVE client of the server."""
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.curve_serverkey = self.server_public


def check_server_keys(directory: Path) -> int:
    """Raise ``KeysMissing`` unless the server keypair and at least one authorised client key are there."""
    _load(directory / f"{SERVER}.key_secret", secret=True)
    authorized = sorted((directory / AUTHORIZED_CLIENTS).glob("*.key"))
    if not authorized:
        raise KeysMissing(f"no client public key (*.key) in {directory / AUTHORIZED_CLIENTS}: nobody could connect")
    return len(authorized)


def serve_curve(ctx: zmq.Context, socket: zmq.Socket, directory: Path) -> ThreadAuthenticator:
    """Make ``socket`` (before it binds) a CURVE server that accepts only the keys in ``authorized_clients/``.

    The ZAP handler runs on its own thread, not on the coordinator's event loop: it is running before the socket
    binds, so no handshake is ever completed unchecked, and a flood of hostile handshakes does not stall the loop
    that serves tokens. It must share the socket's libzmq context (ZAP is an inproc endpoint of that context).
    """
    n_authorized = check_server_keys(directory)
    public, secret = _load(directory / f"{SERVER}.key_secret", secret=True)
    authenticator = ThreadAuthenticator(zmq.Context.shadow(ctx.underlying), log=log)
    authenticator.start()
    authenticator.configure_curve(domain=ZAP_DOMAIN, location=str(directory / AUTHORIZED_CLIENTS))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    socket.zap_domain = ZAP_DOMAIN.encode()
    log.info("CURVE on the client socket: %d authorised client key(s) in %s", n_authorized,
             directory / AUTHORIZED_CLIENTS)
    return authenticator
