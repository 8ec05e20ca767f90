"""mqchat.ports: free ports from a configured range, in turn, never one that is bound."""

from __future__ import annotations

import os
import socket

import pytest

from mqchat import ports
from tests.conftest import worker_port_range


def test_the_range_is_parsed_and_refused_when_malformed() -> None:
    assert ports.configured_range("20000-20009") == (20000, 20009)
    assert ports.configured_range(" 20000 - 20009 ") == (20000, 20009)
    assert ports.configured_range("") is None
    for bad in ("20000", "a-b", "20010-20000", "80-90", "20000-70000", "２０000-20001", "-1-5"):
        with pytest.raises(ports.PortRangeError, match="MQCHAT_PORT_RANGE"):
            ports.configured_range(bad)


def test_ports_come_from_the_range_in_turn_passing_over_a_bound_one(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        low = max(1024, min(taken - 2, 65535 - 5))
        monkeypatch.setenv(ports.RANGE_ENV, f"{low}-{low + 5}")
        picked = [ports.free_port() for _ in range(5)]  # the held port is one of the six
        assert taken not in picked
        assert all(low <= p <= low + 5 for p in picked)
        assert len(set(picked)) == 5, "a port is reused only after the whole range"
        held.listen()
        assert ports.free_port() == picked[0]  # round again, still passing over it


def test_without_a_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ports.RANGE_ENV, raising=False)
    port = ports.free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))  # it was free


def test_each_worker_has_its_own_range_below_the_ephemeral_ports() -> None:
    blocks = [worker_port_range(f"gw{i}") for i in range(6)]
    assert blocks[:2] == ["10000-13999", "14000-17999"]
    assert worker_port_range("master") == blocks[0]
    assert blocks[5] is None  # 30000-33999 would reach the ephemeral range
    assert ports.configured_range(os.environ[ports.RANGE_ENV]) is not None  # one is in effect in this run
