"""TLS at the edge: MQTT over TLS (paho-mqtt, mosquitto_pub --cafile), HTTPS (httpx), TLS 1.2+
only, plain text refused where it is off, mutual TLS, and the certificate replaced while clients
stay connected. Certificates are made in the test (trustme); everything on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mqchat.app import BridgeHandle, run_node
from mqchat.config import Config
from mqchat.ports import free_port
from mqchat.tokens import issue_token
from tests.conftest import make_config, start_served, stop_served
from tests.helpers import installed, send_env, unique
from tests.tls import Certs, PahoDevice, make_certs, served_certificate, with_tls


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "tls")


def token(config: Config, user: str, device: str) -> str:
    return issue_token(secret=config.auth.jwt_secret, user=user, device=device, ttl_s=600)


@pytest.fixture
async def tls_node(tmp_path: Path, certs: Certs) -> AsyncIterator[tuple[Config, BridgeHandle]]:
    config = with_tls(make_config(tmp_path / "data"), certs)
    async with run_node(config) as node:
        yield config, node


def tls_device(
    config: Config, user: str, device: str, port: int, certs: Certs, *, client_cert: tuple[Path, Path] | None = None
) -> PahoDevice:
    """A paho device of user over TLS on port, trusting the test's CA, with a fresh token."""
    return PahoDevice(
        user=user,
        device=device,
        token=token(config, user, device),
        port=port,
        ca_file=certs.ca_file,
        client_cert=client_cert,
    )


async def connected_pair(config: Config, port: int, certs: Certs) -> tuple[PahoDevice, PahoDevice]:
    """alice/phone and bob/tablet connected over TLS, their in topics subscribed."""
    devices = (tls_device(config, user, dev, port, certs) for user, dev in (("alice", "phone"), ("bob", "tablet")))
    alice, bob = devices
    assert await alice.connect() == "Success"
    assert await bob.connect() == "Success"
    await asyncio.sleep(0.3)  # the subscriptions are granted
    return alice, bob


async def test_paho_over_tls_sends_and_receives(tls_node: tuple[Config, BridgeHandle], certs: Certs) -> None:
    config, node = tls_node
    port = node.ports["mqtts"]
    alice, bob = await connected_pair(config, port, certs)
    try:
        alice.publish(send_env("dm:alice:bob", "over TLS", id="m-tls-1"))
        ack = await alice.next("ack")
        assert (ack["id"], ack["seq"]) == ("m-tls-1", 1)
        msg = await bob.next("msg")
        assert (msg["from"], msg["body"]) == ("alice", "over TLS")
    finally:
        alice.close()
        bob.close()


async def test_mosquitto_pub_with_cafile(tls_node: tuple[Config, BridgeHandle], certs: Certs) -> None:
    config, node = tls_node
    mosquitto_pub = installed("mosquitto_pub", why="a TLS client nobody here wrote")
    bob = tls_device(config, "bob", "tablet", node.ports["mqtts"], certs)
    try:
        assert await bob.connect() == "Success"
        await asyncio.sleep(0.3)
        envelope = json.dumps(send_env("dm:alice:bob", "from mosquitto_pub", id="m-pub-1"))
        args = ["-h", "127.0.0.1", "-p", str(node.ports["mqtts"]), "--cafile", str(certs.ca_file), "-q", "1"]
        args += ["-i", "laptop", "-u", "alice", "-P", token(config, "alice", "laptop")]
        done = await asyncio.to_thread(
            subprocess.run,
            [mosquitto_pub, *args, "-t", "u/alice/laptop/out", "-m", envelope],
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        msg = await bob.next("msg")
        assert (msg["from"], msg["dev"], msg["body"]) == ("alice", "laptop", "from mosquitto_pub")
        # Without the CA the server's certificate is not trusted: nothing is sent.
        untrusted = await asyncio.to_thread(
            subprocess.run,
            [
                mosquitto_pub,
                *[a for a in args if a not in ("--cafile", str(certs.ca_file))],
                "--capath",
                "/nonexistent",
                "-t",
                "u/alice/laptop/out",
                "-m",
                envelope,
            ],
            capture_output=True,
            timeout=30,
        )
        assert untrusted.returncode != 0
    finally:
        bob.close()


async def test_https_with_httpx(tls_node: tuple[Config, BridgeHandle], certs: Certs) -> None:
    config, node = tls_node
    base = f"https://127.0.0.1:{node.ports['https']}"
    trusting = ssl.create_default_context(cafile=str(certs.ca_file))
    async with httpx.AsyncClient(base_url=base, verify=trusting, timeout=10) as http:
        assert (await http.get("/healthz")).status_code == 200
        headers = {"Authorization": f"Bearer {token(config, 'alice', 'http')}"}
        answer = await http.get("/v1/conversations", headers=headers)
        assert answer.status_code == 200
        assert "conversations" in answer.json()
    async with httpx.AsyncClient(base_url=base, timeout=10) as untrusting:  # the system's CAs only
        with pytest.raises(httpx.ConnectError):
            await untrusting.get("/healthz")


def handshake(port: int, ca_file: Path, *, highest: ssl.TLSVersion) -> str:
    context = ssl.create_default_context(cafile=str(ca_file))
    with warnings.catch_warnings():  # a client that offers TLS 1.1 at most, on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = highest
    context.set_ciphers("ALL:@SECLEVEL=0")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return str(tls.version())


async def test_only_tls_1_2_and_later(tls_node: tuple[Config, BridgeHandle], certs: Certs) -> None:
    _, node = tls_node
    for kind in ("mqtts", "https"):
        port = node.ports[kind]
        assert await asyncio.to_thread(handshake, port, certs.ca_file, highest=ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        assert await asyncio.to_thread(handshake, port, certs.ca_file, highest=ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(handshake, port, certs.ca_file, highest=ssl.TLSVersion.TLSv1_1)


async def test_plaintext_off_opens_only_tls_listeners(tmp_path: Path, certs: Certs) -> None:
    config = with_tls(make_config(tmp_path / "data"), certs, plaintext=False, wss_port=0, ws_port=0)
    async with run_node(config) as node:
        assert sorted(node.ports) == ["https", "mqtts", "wss"]
        assert (node.mqtt_port, node.http_port) == (0, 0)
        # Plain MQTT on the TLS port: no CONNACK, the connection is dropped.
        connect = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0])
        reader, writer = await asyncio.open_connection("127.0.0.1", node.ports["mqtts"])
        writer.write(connect)
        await writer.drain()
        async with asyncio.timeout(15):
            answer = await reader.read(4)
        assert not answer.startswith(b"\x20"), "a CONNACK in plain text"
        writer.close()
        # Plain HTTP on the HTTPS port gets no HTTP answer.
        async with httpx.AsyncClient(timeout=15) as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(f"http://127.0.0.1:{node.ports['https']}/healthz")
        # TLS still works.
        device = tls_device(config, "carol", "phone", node.ports["mqtts"], certs)
        try:
            assert await device.connect() == "Success"
        finally:
            device.close()


async def test_mutual_tls_requires_a_client_certificate(tmp_path: Path, certs: Certs) -> None:
    config = with_tls(make_config(tmp_path / "data"), certs, tls_client_ca=str(certs.ca_file))
    client = certs.ca.issue_cert("carol-phone")
    client_cert, client_key = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(client_cert)
    client.private_key_pem.write_to_path(client_key)
    async with run_node(config) as node:
        port = node.ports["mqtts"]
        anonymous = tls_device(config, "carol", "phone", port, certs)
        try:
            # TLS 1.2 fails the handshake; under TLS 1.3 the server refuses right after it.
            answer = await anonymous.connect(timeout=3)
        except (ssl.SSLError, OSError):
            answer = "handshake refused"
        finally:
            anonymous.close()
        assert answer in ("handshake refused", "no CONNACK")
        holder = tls_device(config, "carol", "phone", port, certs, client_cert=(client_cert, client_key))
        try:
            assert await holder.connect() == "Success"
        finally:
            holder.close()
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(certs.ca_file)), timeout=10) as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(f"https://127.0.0.1:{node.ports['https']}/healthz")
        context = ssl.create_default_context(cafile=str(certs.ca_file))
        context.load_cert_chain(client_cert, client_key)
        async with httpx.AsyncClient(verify=context, timeout=10) as http:
            assert (await http.get(f"https://127.0.0.1:{node.ports['https']}/healthz")).status_code == 200


async def test_certificate_replaced_while_clients_stay_connected(tmp_path: Path, certs: Certs) -> None:
    config = with_tls(make_config(tmp_path / "data"), certs, wss_port=0)
    async with run_node(config) as node:
        assert node.tls is not None
        before = await asyncio.to_thread(served_certificate, node.ports["mqtts"], certs.ca_file)
        port = node.ports["mqtts"]
        alice, bob = await connected_pair(config, port, certs)
        try:
            # A new certificate (from a new CA that clients trust too) is written over the files.
            new_ca = certs.ca.__class__()
            new_ca.cert_pem.write_to_path(certs.ca_file, append=True)
            after = certs.reissue(new_ca)
            assert after != before
            reloads = node.tls.reloads
            for _ in range(100):  # the watcher notices within its interval
                if node.tls.reloads > reloads:
                    break
                await asyncio.sleep(0.1)
            assert node.tls.reloads == reloads + 1
            for kind in ("mqtts", "https", "wss"):
                assert await asyncio.to_thread(served_certificate, node.ports[kind], certs.ca_file) == after, kind
            # The connections made before go on working.
            assert (alice.connected(), bob.connected()) == (True, True)
            alice.publish(send_env("dm:alice:bob", "after the rotation", id=unique("rot")))
            assert (await bob.next("msg"))["body"] == "after the rotation"
            # A pair that does not load (a key of another certificate) is refused; the new one stays.
            certs.key_file.write_bytes(new_ca.issue_cert("127.0.0.1").private_key_pem.bytes())
            assert node.tls.reload_if_changed(force=True) is False
            assert await asyncio.to_thread(served_certificate, port, certs.ca_file) == after
        finally:
            alice.close()
            bob.close()


def test_tls_settings_that_cannot_work_are_refused(tmp_path: Path) -> None:
    from mqchat.config import load_config
    from mqchat.errors import ConfigError

    base = {"data_dir": str(tmp_path), "jwt_secret": "s" * 32}
    for flags, words in (
        ({"tls_cert": "a.pem"}, "go together"),
        ({"tls_client_ca": "ca.pem"}, "needs tls_cert"),
        ({"wss_port": "8084"}, "needs TLS"),
        ({"plaintext": "false"}, "needs TLS"),
        ({"ws_path": "mqtt"}, "not a URL path"),
    ):
        with pytest.raises(ConfigError, match=words):
            load_config(base | flags, env={})
    config, _ = load_config(base | {"ws_port": "off", "mqtts_port": "none"}, env={})
    assert (config.network.ws_port, config.network.mqtts_port) == (None, None)
    assert dataclasses.asdict(config.network)["plaintext"] is True


def overwrite_unseen(path: Path, data: bytes) -> None:
    """Write data over path in place (same inode, same size) and put its mtime back: a change
    the file watcher cannot see."""
    stat = path.stat()
    assert len(data) == stat.st_size
    with path.open("r+b") as out:
        out.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


async def test_mqchat_serve_reloads_its_certificate_on_sighup(tmp_path: Path, certs: Certs) -> None:
    https_port, mqtts_port = free_port(), free_port()
    env = {
        "MQCHAT_TLS_CERT": str(certs.cert_file),
        "MQCHAT_TLS_KEY": str(certs.key_file),
        "MQCHAT_HTTPS_PORT": str(https_port),
        "MQCHAT_MQTTS_PORT": str(mqtts_port),
    }
    served = start_served(tmp_path / "data", "h" * 40, tmp_path / "serve.log", adapter="inbroker", env=env)
    try:
        await served.wait_healthy()
        before = await asyncio.to_thread(served_certificate, https_port, certs.ca_file)
        node = served.pid("node")
        # A new certificate of the same sizes, written so that only SIGHUP can make it known.
        cert_size, key_size = certs.cert_file.stat().st_size, certs.key_file.stat().st_size
        for _ in range(50):
            issued = certs.ca.issue_cert("127.0.0.1", "localhost")
            cert, key = issued.cert_chain_pems[0].bytes(), issued.private_key_pem.bytes()
            if (len(cert), len(key)) == (cert_size, key_size):
                break
        else:
            raise AssertionError("no certificate of the same size was issued")
        overwrite_unseen(certs.cert_file, cert)
        overwrite_unseen(certs.key_file, key)
        await asyncio.sleep(3)  # longer than the watcher's interval: it saw nothing
        assert await asyncio.to_thread(served_certificate, https_port, certs.ca_file) == before
        served.proc.send_signal(signal.SIGHUP)
        after = ssl.PEM_cert_to_DER_cert(cert.decode())
        for _ in range(50):
            if await asyncio.to_thread(served_certificate, mqtts_port, certs.ca_file) == after:
                break
            await asyncio.sleep(0.1)
        for port in (https_port, mqtts_port):
            assert await asyncio.to_thread(served_certificate, port, certs.ca_file) == after
        assert served.pid("node") == node, "reloaded, not restarted"
        assert "SIGHUP: reloading the TLS certificate" in served.log()
    finally:
        assert stop_served(served) == 0
