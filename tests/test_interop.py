"""Clients nobody here wrote: mosquitto_pub / mosquitto_sub and paho-mqtt, against `mqchat serve`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from mqchat.ids import dm_conv
from tests.conftest import Served
from tests.helpers import repo_env, unique

needs_mosquitto_clients = pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None and "CI" not in os.environ,
    reason="mosquitto-clients not installed (make test installs it)",
)


def _cli_token(served: Served, user: str, device: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mqchat",
            "token",
            "--user",
            user,
            "--device",
            device,
            "--data-dir",
            str(served.data_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=repo_env() | {"MQCHAT_JWT_SECRET": served.secret},
        timeout=60,
    )
    return out.stdout.strip()


@needs_mosquitto_clients
@pytest.mark.parametrize("served", ["inbroker", "mqtt"], indirect=True)
async def test_mosquitto_clients_chat_and_the_message_survives_kill9(served: Served) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    port = str(served.mqtt_port)
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-i", "b1", "-u", bob, "-P", _cli_token(served, bob, "b1"),
        "-q", "1", "-t", f"u/{bob}/in", "-C", "1", "-W", "30",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(1.0)  # let the subscription land
    send = {"type": "send", "id": "mosq-1", "conv": conv, "body": "hello from mosquitto_pub"}
    pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-i", "a1", "-u", alice, "-P", _cli_token(served, alice, "a1"),
        "-q", "1", "-t", f"u/{alice}/a1/out", "-m", json.dumps(send),
    )  # fmt: skip
    async with asyncio.timeout(30):
        assert await pub.wait() == 0
    async with asyncio.timeout(40):
        out, err = await sub.communicate()
    assert sub.returncode == 0, err
    msg = json.loads(out)
    assert msg["type"] == "msg"
    assert (msg["conv"], msg["seq"], msg["from"], msg["dev"], msg["id"]) == (conv, 1, alice, "a1", "mosq-1")
    assert msg["body"] == "hello from mosquitto_pub"

    for process in served.processes():
        await served.kill9(process)
    async with served.http(bob) as http:
        page = (await http.get(f"/v1/conversations/{conv}/messages", params={"after": 0})).json()
    assert [(m["seq"], m["id"], m["body"]) for m in page["messages"]] == [(1, "mosq-1", "hello from mosquitto_pub")]


@needs_mosquitto_clients
async def test_mosquitto_sub_with_a_bad_token_is_refused(served: Served) -> None:
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-h", "127.0.0.1", "-p", str(served.mqtt_port), "-i", "b1", "-u", "bob", "-P", "forged",
        "-t", "u/bob/in", "-C", "1", "-W", "10",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(20):
        _, err = await sub.communicate()
    assert sub.returncode != 0
    assert b"not authori" in err.lower()


def test_paho_client_sends_and_receives(served: Served) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    received: list[dict[str, object]] = []

    def on_message(_c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        received.append(json.loads(message.payload))

    clients = []
    for user, device in ((alice, "a1"), (bob, "b1")):
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=device, clean_session=True)
        c.username_pw_set(user, served.token(user, device))
        c.on_message = on_message
        c.connect("127.0.0.1", served.mqtt_port, keepalive=30)
        c.loop_start()
        c.subscribe([(f"u/{user}/in", 1), (f"u/{user}/{device}/in", 1)])
        clients.append(c)
    try:
        time.sleep(0.5)
        info = clients[0].publish(
            f"u/{alice}/a1/out", json.dumps({"type": "send", "id": "paho-1", "conv": conv, "body": "hi"}), qos=1
        )
        info.wait_for_publish(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len([r for r in received if r["type"] in ("ack", "msg")]) < 3:
            time.sleep(0.05)
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
    kinds = sorted(str(r["type"]) for r in received)
    assert kinds == ["ack", "msg", "msg"]  # alice's ack, alice's own copy, bob's copy


async def test_cli_send_and_listen_commands(served: Served) -> None:
    alice, bob = unique("alice"), unique("bob")
    env = repo_env() | {"MQCHAT_JWT_SECRET": served.secret}
    common = ["--data-dir", str(served.data_dir), "--mqtt-port", str(served.mqtt_port)]
    listen = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mqchat", "listen", "--user", bob, "--device", "bob-cli",
        "--count", "1", "--timeout", "30", *common,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(2.0)  # the listener subscribes
    send = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mqchat", "send", "--user", alice, "--device", "alice-cli",
        "--to", bob, "--body", "via CLI", *common,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        send_out, send_err = await send.communicate()
    assert send.returncode == 0, send_err
    ack = json.loads(send_out)
    assert ack["type"] == "ack"
    assert ack["conv"] == dm_conv(alice, bob)
    assert ack["seq"] == 1
    async with asyncio.timeout(60):
        listen_out, listen_err = await listen.communicate()
    assert listen.returncode == 0, listen_err
    event = json.loads(listen_out.splitlines()[0])
    assert (event["type"], event["from"], event["body"], event["seq"]) == ("msg", alice, "via CLI", 1)


@pytest.mark.parametrize("served", ["inbroker", "mqtt"], indirect=True)
def test_metrics_cover_every_process(served: Served) -> None:
    alice, bob = unique("alice"), unique("bob")
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="a1")
    c.username_pw_set(alice, served.token(alice, "a1"))
    acked: list[bytes] = []
    c.on_message = lambda _c, _u, m: acked.append(m.payload)
    c.connect("127.0.0.1", served.mqtt_port)
    c.loop_start()
    try:
        c.subscribe(f"u/{alice}/a1/in", qos=1)
        time.sleep(0.5)
        body = json.dumps({"type": "send", "id": "met-1", "conv": dm_conv(alice, bob), "body": "x"})
        c.publish(f"u/{alice}/a1/out", body, qos=1)
        deadline = time.monotonic() + 10
        while not acked and time.monotonic() < deadline:
            time.sleep(0.05)
        text = httpx.get(f"http://127.0.0.1:{served.http_port}/metrics", timeout=10).text
    finally:
        c.loop_stop()
        c.disconnect()
    assert acked, "no ack"
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if set(sample.labels) <= {"node"}  # every sample carries this node's label; nothing else here
    }
    assert samples["mqchat_messages_accepted_total"] == 1.0
    assert samples["mqchat_broker_connected_clients"] >= 1.0
