"""The HTTP edge: body size limited before the body is read, authentication before a body is
parsed, a timeout for headers, a cap on connections, and the presence query at its full size."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from tests.conftest import Stack, make_config, open_stack
from tests.helpers import unique


async def _raw(port: int, request: bytes, *, read_s: float = 5.0) -> bytes:
    """Send request bytes (possibly only headers) and read until the server closes or read_s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = b""
        try:
            async with asyncio.timeout(read_s):
                while chunk := await reader.read(65536):
                    data += chunk
                    if b"\r\n\r\n" in data and _complete(data):
                        break
        except TimeoutError:
            pass
        return data
    finally:
        writer.close()


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _status_and_json(data: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


async def test_a_body_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    async with open_stack(make_config(tmp_path, http_max_body_bytes=1000), "inbroker") as stack:
        token = stack.token(unique("alice"), "h")
        # Headers announce 10 MB; none of it is sent. The answer comes at once.
        started = time.perf_counter()
        data = await _raw(
            stack.http_port,
            b"POST /v1/groups HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + token.encode() + b"\r\ncontent-length: 10000000\r\n\r\n",
        )
        status, body = _status_and_json(data)
        assert (status, body["error"]) == (413, "too_large")
        assert time.perf_counter() - started < 4
        # No length announced (chunked): refused once the limit is passed.
        chunk = b"x" * 600
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
        data = await _raw(
            stack.http_port,
            b"POST /v1/groups HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + token.encode() + b"\r\ntransfer-encoding: chunked\r\n\r\n" + chunked,
        )
        assert _status_and_json(data)[0] == 413
        async with stack.http(unique("bob")) as http:
            fine = await http.post("/v1/groups", json={"name": "g", "members": []})
            assert fine.status_code == 201, "a body under the limit is served"


async def test_authentication_comes_before_the_body(tmp_path: Path) -> None:
    async with open_stack(make_config(tmp_path), "inbroker") as stack:
        # A forged token and a body that never arrives: 401 at once, without waiting for it.
        data = await _raw(
            stack.http_port,
            b"POST /v1/groups HTTP/1.1\r\nhost: x\r\nauthorization: Bearer forged\r\n"
            b"content-type: application/json\r\ncontent-length: 5000\r\n\r\n",
        )
        status, body = _status_and_json(data)
        assert (status, body["error"]) == (401, "unauthorized")


async def test_a_connection_that_trickles_its_headers_is_closed(tmp_path: Path) -> None:
    async with open_stack(make_config(tmp_path, http_header_timeout_s=1.0), "inbroker") as stack:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.http_port)
        started = time.perf_counter()
        closed_after = None
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 40:
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    async with asyncio.timeout(0.2):
                        if await reader.read(1) == b"":
                            closed_after = time.perf_counter() - started
                            break
                except TimeoutError:
                    continue
        finally:
            writer.close()
        assert closed_after is not None, "still open after trickling headers for 12 s"
        assert 0.9 < closed_after < 4
        async with stack.http() as http:
            assert (await http.get("/healthz")).status_code == 200, "an ordinary request is served"


async def test_headers_over_16_kib_get_431_and_a_large_body_is_not_mistaken_for_them(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.http_port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-big: " + b"a" * 20_000)  # no end
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()  # to the close
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), head
    assert json.loads(body)["error"] == "too_large"
    # Headers and a body of 200 KiB arriving together are not headers over the limit.
    async with stack.http("alice") as http:
        answer = await http.put("/v1/me/settings", content=b"{" + b" " * 200_000 + b"}")
    assert answer.status_code != 431, answer.text


async def test_connections_beyond_the_cap_are_refused_and_others_served_after(tmp_path: Path) -> None:
    async with open_stack(make_config(tmp_path, http_max_connections=4), "inbroker") as stack:
        held = [await asyncio.open_connection("127.0.0.1", stack.http_port) for _ in range(4)]
        try:
            data = await _raw(stack.http_port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert data.split(b" ")[1] == b"503"
        finally:
            for _, writer in held:
                writer.close()
        await asyncio.sleep(0.2)
        async with stack.http() as http:
            assert (await http.get("/healthz")).status_code == 200


async def test_presence_takes_200_ids_of_64_characters(stack: Stack) -> None:
    me = "u" * 60 + unique("")[-4:]
    async with stack.http(me) as http:
        answer = await http.get("/v1/presence", params={"users": ",".join([me] * 200)})
        assert answer.status_code == 200, answer.text
        too_many = await http.get("/v1/presence", params={"users": ",".join([me] * 201)})
        assert too_many.status_code == 400


async def test_text_that_is_not_valid_unicode_is_refused_over_http(stack: Stack) -> None:
    """A lone UTF-16 surrogate in any text field is a 400 with a JSON body, as over MQTT."""
    async with stack.http(unique("alice")) as http:
        for path, body in (
            ("/v1/groups", b'{"name":"a\\ud800b","members":[]}'),
            ("/v1/groups", b'{"name":"ok","members":["\\udfff"]}'),
        ):
            r = await http.post(path, content=body, headers={"content-type": "application/json"})
            assert (r.status_code, r.json()["error"]) == (400, "bad_request"), r.text
        r = await http.put(
            "/v1/me/settings", content=b'{"presence":"\\ud83d"}', headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
