"""Certificates made in the test (trustme) and a paho-mqtt client over TCP+TLS, WebSocket or WSS,
run in its own thread (paho's TLS handshake blocks, and the server shares the test's loop)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import trustme

from mqchat.config import Config


@dataclass(frozen=True)
class Certs:
    """A CA, and a server certificate it signed for 127.0.0.1, as PEM files."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def reissue(self, ca: trustme.CA | None = None) -> bytes:
        """Write a new server certificate (by ``ca``, default the same CA) over the files;
        returns its DER bytes."""
        issued = (ca or self.ca).issue_cert("127.0.0.1", "localhost")
        issued.private_key_pem.write_to_path(self.key_file)
        issued.cert_chain_pems[0].write_to_path(self.cert_file)
        for extra in issued.cert_chain_pems[1:]:
            extra.write_to_path(self.cert_file, append=True)
        return ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    certs = Certs(ca, directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(certs.ca_file)
    certs.reissue()
    return certs


def with_tls(config: Config, certs: Certs, **network: Any) -> Config:
    """config serving TLS with certs, every TLS listener on a free port (network overrides)."""
    settings: dict[str, Any] = {
        "tls_cert": str(certs.cert_file),
        "tls_key": str(certs.key_file),
        "mqtts_port": 0,
        "https_port": 0,
    }
    return dataclasses.replace(config, network=dataclasses.replace(config.network, **(settings | network)))


def served_certificate(port: int, ca_file: Path) -> bytes:
    """The DER certificate a TLS handshake on port presents now (blocking: run in a thread)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


class PahoDevice:
    """A device on paho-mqtt: connect (TLS with ``ca_file``, a client certificate, or WebSocket
    on ``ws_path``), subscribe to its in topics, publish envelopes; received envelopes queue up."""

    def __init__(
        self,
        *,
        user: str,
        device: str,
        token: str,
        port: int,
        ca_file: Path | None = None,
        ws_path: str | None = None,
        client_cert: tuple[Path, Path] | None = None,
    ) -> None:
        self.user, self.device = user, device
        self.port = port
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()
        self.connack: queue.Queue[str] = queue.Queue()
        transport = "websockets" if ws_path is not None else "tcp"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, transport=transport)
        if ws_path is not None:
            self.client.ws_set_options(path=ws_path)
        if ca_file is not None:
            cert, key = client_cert if client_cert is not None else (None, None)
            self.client.tls_set(ca_certs=str(ca_file), certfile=cert and str(cert), keyfile=key and str(key))
        self.client.username_pw_set(user, token)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, m: self.received.put(json.loads(m.payload))

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack.put(str(reason))
        if not reason.is_failure:
            client.subscribe([(f"u/{self.user}/in", 1), (f"u/{self.user}/{self.device}/in", 1)])

    async def connect(self, timeout: float = 10.0) -> str:
        """Connect; the CONNACK's reason ("Success" when accepted; "no CONNACK" when none came
        within timeout). A TLS handshake the server refuses raises ssl.SSLError or OSError."""
        await asyncio.to_thread(self.client.connect, "127.0.0.1", self.port, 30)
        self.client.loop_start()
        try:
            return await asyncio.to_thread(self.connack.get, True, timeout)
        except queue.Empty:
            return "no CONNACK"

    def publish(self, envelope: dict[str, Any]) -> None:
        self.client.publish(f"u/{self.user}/{self.device}/out", json.dumps(envelope), qos=1)

    async def next(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next received envelope of type ``kind`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                envelope = await asyncio.to_thread(self.received.get, True, min(left, 0.5))
            except queue.Empty:
                continue
            if envelope.get("type") == kind:
                return envelope
        raise AssertionError(f"no {kind} envelope within {timeout} s")

    def connected(self) -> bool:
        return bool(self.client.is_connected())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        # paho keeps the socket pair that woke its network thread until the client is collected
        # (then the sockets may be collected first: a ResourceWarning); reinitialise closes it.
        self.client.reinitialise()
