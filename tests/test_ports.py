"""mqchat.ports: free ports from a configured range, in turn, never one that is bound; and each
test worker's share of the ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mqchat import ports
from tests.conftest import ephemeral_low, worker_port_range

# Just below the ephemeral range, past the workers' blocks (those end at 29999): ports that no
# server of the suite (with the default blocks) nor any outgoing connection takes.
QUIET = (ephemeral_low() - 1000, ephemeral_low() - 1)


def test_the_range_is_parsed_and_refused_when_malformed() -> None:
    assert ports.configured_range("20000-20009") == (20000, 20009)
    assert ports.configured_range(" 20000 - 20009 ") == (20000, 20009)
    assert ports.configured_range("") is None
    for bad in ("20000", "a-b", "20010-20000", "80-90", "20000-70000", "２０000-20001", "-1-5"):
        with pytest.raises(ports.PortRangeError, match="MQCHAT_PORT_RANGE"):
            ports.configured_range(bad)


def held_port() -> socket.socket:
    """A listener on a port of QUIET."""
    for port in range(QUIET[0] + 10, QUIET[1] - 10):
        listener = socket.socket()
        try:
            listener.bind(("127.0.0.1", port))
        except OSError:
            listener.close()
            continue
        listener.listen()
        return listener
    raise AssertionError(f"no port of {QUIET} could be bound")


def test_ports_come_from_the_range_in_turn_passing_over_a_bound_one(monkeypatch: pytest.MonkeyPatch) -> None:
    with held_port() as held:
        taken = held.getsockname()[1]
        low, high = taken - 10, taken + 9
        monkeypatch.setenv(ports.RANGE_ENV, f"{low}-{high}")
        picked = [ports.free_port() for _ in range(12)]
        assert taken not in picked
        assert all(low <= p <= high for p in picked)
        assert len(set(picked)) == 12, "a port is reused only after the whole range"
        steps = [(p - picked[0]) % 20 for p in picked]
        assert steps == sorted(steps), "in turn, round the range from a random start"


FORKED = """
import os, sys
from mqchat import ports
os.environ[ports.RANGE_ENV] = sys.argv[1]
ports.free_port()  # the parent's round has begun
assert ports._cursor
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # the child: whether it holds a round yet, and a pick; then gone, whatever happens
    try:
        os.write(write, f"{not ports._cursor} {ports.free_port()}".encode())
    finally:
        os._exit(0)
os.close(write)
os.waitpid(pid, 0)
print(os.read(read, 64).decode())
"""


def test_a_forked_child_does_not_repeat_its_parents_picks() -> None:
    """The child of a fork begins a round of its own (from a random start of its own), rather
    than going on with its parent's next picks. (Forked in a process of its own: this one has
    threads.)"""
    run = subprocess.run(
        [sys.executable, "-c", FORKED, f"{QUIET[0]}-{QUIET[1]}"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    fresh, pick = run.stdout.split()
    assert fresh == "True"
    assert QUIET[0] <= int(pick) <= QUIET[1]


def test_without_a_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ports.RANGE_ENV, raising=False)
    port = ports.free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))  # it was free


def test_each_worker_has_its_own_range_below_the_ephemeral_ports(tmp_path: Path) -> None:
    edge = ephemeral_low()
    for i in range(6):
        low = 10000 + 4000 * i
        expected = f"{low}-{low + 3999}" if low + 4000 <= edge else None
        assert worker_port_range(f"gw{i}") == expected
    assert worker_port_range("master") == worker_port_range("gw0")
    # A range given to the whole run is shared out (a worker started in place of a crashed one
    # takes the share of its number modulo the workers).
    assert [worker_port_range(f"gw{i}", 3, "20000-20899") for i in range(4)] == [
        "20000-20299",
        "20300-20599",
        "20600-20899",
        "20000-20299",
    ]
    with pytest.raises(ports.PortRangeError, match="fewer ports"):
        worker_port_range("gw0", 3, "20000-20001")
    proc = tmp_path / "ip_local_port_range"
    proc.write_text("40000\t60999\n")
    assert ephemeral_low(proc) == 40000
    assert ephemeral_low(tmp_path / "missing") == 32768


def test_the_suites_child_processes_inherit_the_workers_range() -> None:
    code = "import os; print(os.environ.get('MQCHAT_PORT_RANGE', ''))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert child.stdout.strip() == os.environ.get(ports.RANGE_ENV, "")
