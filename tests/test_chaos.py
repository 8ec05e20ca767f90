"""The chaos conversation (tests/chaos.py) against one `mqchat serve`: the bridge is `kill -9`'d
twice and the broker once while 2,000 messages cross a lossy network."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import Fault, run_chaos
from tests.conftest import Served

SEND_SECONDS = 26.0


@pytest.mark.timeout(420)
async def test_chaos_conversation(served: Served, tmp_path: Path) -> None:
    async def kill(which: str) -> None:
        await served.kill9(which)

    faults = [
        Fault(0.25, "bridge kill -9", lambda: kill("bridge")),
        Fault(0.5, "broker kill -9", lambda: kill("broker")),
        Fault(0.75, "bridge kill -9", lambda: kill("bridge")),
    ]
    print("\nchaos: " + await run_chaos(served, tmp_path, faults, send_seconds=SEND_SECONDS))
