"""schemathesis against the running server's own /openapi.json: every operation, generated
requests (valid and invalid), every check; the document must describe exactly what the server
answers (statuses, bodies, content types, headers), and nothing may fail with a 5xx.

One check is left out, with its reason: ``positive_data_acceptance`` expects every request the
schema allows to succeed, but some rules cannot be written in OpenAPI: a 1:1 id names its two
users sorted (``dm:bob:alice`` is ``bad_conv``), a sync cursor must be one this server issued
(``bad_cursor``), ``after`` and ``before`` exclude each other. Those answers are 400s that the
document declares, with their codes in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import Served, start_served, stop_served

MAX_EXAMPLES = 15  # per operation and phase: bounded, about a minute in all


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Served]:
    # The HTTP budget is raised so the fuzzer tests what is behind it (429 is tested elsewhere).
    unlimited = {"MQCHAT_HTTP_RATE": "1000000", "MQCHAT_HTTP_BURST": "1000000"}
    served = start_served(
        tmp_path / "data", secrets.token_urlsafe(32), tmp_path / "serve.log", adapter="inbroker", env=unlimited
    )
    try:
        await served.wait_healthy()
        yield served
    finally:
        stop_served(served)


async def schemathesis(node: Served, cwd: Path, token: str, *options: str) -> tuple[str, int, int, int]:
    """Run schemathesis on the server's document; (report, tested, selected, operations)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"http://127.0.0.1:{node.http_port}/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "20261205",
        "--no-color",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
    )
    try:
        async with asyncio.timeout(240):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report[-8000:]
    tested = re.search(r"Tested: (\d+)", report)
    selected = re.search(r"Selected: (\d+)/(\d+)", report)
    assert tested is not None, report[-3000:]
    assert selected is not None, report[-3000:]
    return report, int(tested.group(1)), int(selected.group(1)), int(selected.group(2))


ACCOUNT_OPERATIONS = 3
"""The "accounts" routes (logout, log out another device, delete the account): each ends the
fuzzer's token, so they run apart, with a token of their own."""


@pytest.mark.timeout(480)  # two runs of schemathesis, each bounded at 240 s
async def test_the_openapi_document_describes_what_the_server_answers(node: Served, tmp_path: Path) -> None:
    token = node.token("fuzzer", "fuzzer-device")
    report, tested, selected, operations = await schemathesis(
        node, tmp_path, token, "--exclude-checks", "positive_data_acceptance", "--exclude-tag", "accounts"
    )
    assert tested == selected == operations - ACCOUNT_OPERATIONS, report[-3000:]  # every other operation
    # The account routes: once the token is revoked every answer is 401, TRACE included (the token
    # is checked before the method), which the unsupported-method check cannot expect.
    farewell = node.token("leaver", "leaver-device")
    report, tested, selected, _ = await schemathesis(
        node,
        tmp_path,
        farewell,
        "--exclude-checks",
        "positive_data_acceptance,unsupported_method",
        "--include-tag",
        "accounts",
    )
    assert tested == selected == ACCOUNT_OPERATIONS, report[-3000:]
