"""A first run as a new user makes it: the README tour as written, clear one-line failures.

Every command here runs as a real process (``python -m mqchat …``, stock ``mosquitto_sub`` /
``mosquitto_pub``, ``curl``) against a real ``mqchat serve`` started the way ``make serve``
starts it: in a folder of its own, generating its secret into ``./data``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mqchat.config import load_config
from mqchat.ports import free_port
from mqchat.supervisor import EXIT_CANNOT_START, Supervisor
from tests.helpers import repo_env, serve_in

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent  # where the mqchat console script is installed


def mqchat(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqchat", *args],
        cwd=cwd,
        env=repo_env() | (env or {}),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("mqchat: "), lines[0]
    return lines[0]


# --- clear failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["mqtt", "http"])
def test_serve_on_a_busy_port_exits_non_zero_with_one_line(tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = (
            {"mqtt": str(busy), "http": str(free_port())}
            if which == "mqtt"
            else {"mqtt": str(free_port()), "http": str(busy)}
        )
        started = time.monotonic()
        done = mqchat("serve", "--mqtt-port", ports["mqtt"], "--http-port", ports["http"], cwd=tmp_path)
    assert done.returncode != 0
    line = one_line(done.stderr + done.stdout)
    assert f"port {busy} on 127.0.0.1 is already in use" in line
    assert f"--{which}-port" in line
    assert time.monotonic() - started < 30, "it must fail at once, not retry"


def test_a_child_that_cannot_listen_exits_with_one_line_and_serve_stops(tmp_path: Path) -> None:
    """The race the start-up check cannot close (the port is taken between the supervisor's check
    and the child's bind): the child says why in one line and exits EXIT_CANNOT_START, and the
    supervisor stops with a non-zero exit instead of restarting it in a loop."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        settings = {
            "MQCHAT_MQTT_PORT": str(busy),
            "MQCHAT_HTTP_PORT": str(free_port()),
            "MQCHAT_DATA_DIR": str(tmp_path / "data"),
            "MQCHAT_JWT_SECRET": "s" * 40,
            "MQCHAT_LOG_LEVEL": "WARNING",  # no start-up INFO lines: only what goes wrong
        }
        child = mqchat("_child", "node", cwd=tmp_path, env=settings)
        assert child.returncode == EXIT_CANNOT_START
        assert "address already in use" in one_line(child.stderr).lower()

        config, _ = load_config({}, settings)
        started = time.monotonic()
        assert asyncio.run(Supervisor(config=config).run()) == 1
        assert time.monotonic() - started < 30


def test_a_data_dir_that_cannot_be_used_is_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = mqchat("serve", "--data-dir", str(not_a_dir), "--mqtt-port", "0", "--http-port", "0", cwd=tmp_path)
    assert done.returncode == 1
    assert str(not_a_dir) in one_line(done.stderr)


@pytest.mark.parametrize(
    ("args", "env", "key"),
    [
        (["--log-level", "LOUD"], {}, "log_level"),
        (["--mqtt-port", "abc"], {}, "mqtt_port"),
        (["--http-port", "70000"], {}, "http_port"),
        (["--presence-grace", "soon"], {}, "presence_grace"),
        (["--adapter", "carrier-pigeon"], {}, "--adapter"),
        ([], {"MQCHAT_PUSH_RATE": "0"}, "push_rate"),
        ([], {"MQCHAT_MAX_INFLIGHT": "-1"}, "max_inflight"),
        ([], {"MQCHAT_HISTORY_MAX_LIMIT": "lots"}, "history_max_limit"),
    ],
)
def test_a_bad_setting_is_one_line_naming_its_key(
    tmp_path: Path, args: list[str], env: dict[str, str], key: str
) -> None:
    done = mqchat("serve", *args, cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert key in one_line(done.stderr)
    assert done.stdout == ""


def test_help_shows_no_internal_commands(tmp_path: Path) -> None:
    done = mqchat("--help", cwd=tmp_path)
    assert done.returncode == 0
    for command in ("serve", "token", "chat", "send", "listen", "bench"):
        assert command in done.stdout
    assert "_child" not in done.stdout
    assert "SUPPRESS" not in done.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["token", "--user", "alice", "--device", "a1"],
        ["send", "--user", "alice", "--device", "a1", "--to", "bob", "--body", "hi"],
        ["listen", "--user", "bob", "--device", "b1", "--count", "1"],
        ["chat", "--user", "alice", "--device", "a1", "--to", "bob"],
    ],
)
def test_client_commands_outside_the_data_dir_never_create_a_secret(tmp_path: Path, command: list[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = mqchat(*command, cwd=elsewhere)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "no JWT secret found" in line
    assert str(elsewhere / "data" / "jwt_secret") in line
    assert not (elsewhere / "data").exists()
    explicit = tmp_path / "nowhere"
    done = mqchat(*command, "--data-dir", str(explicit), cwd=elsewhere)
    assert done.returncode == 2
    assert str(explicit / "jwt_secret") in one_line(done.stderr)
    assert not explicit.exists()


async def test_client_commands_find_the_servers_secret_from_a_subfolder(tmp_path: Path) -> None:
    from mqchat.config import load_config
    from mqchat.tokens import TokenVerifier

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("")  # a project folder, as a clone where `make serve` runs
    config, generated = load_config({"data_dir": checkout / "data"}, {})  # as `mqchat serve` there does
    assert generated
    deeper = checkout / "docs" / "notes"
    deeper.mkdir(parents=True)
    done = mqchat("token", "--user", "alice", "--device", "a1", cwd=deeper)
    assert done.returncode == 0, done.stderr
    identity = await TokenVerifier(secret=config.auth.jwt_secret).verify(done.stdout.strip())
    assert (identity.user, identity.device) == ("alice", "a1")
    assert not (deeper / "data").exists()
    # Outside a project folder only ./data counts: a data/jwt_secret above is someone else's.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "jwt_secret").write_text("not the server's\n")
    elsewhere = tmp_path / "elsewhere" / "deep"
    elsewhere.mkdir(parents=True)
    done = mqchat("token", "--user", "alice", "--device", "a1", cwd=elsewhere)
    assert done.returncode == 2
    assert "no JWT secret found" in one_line(done.stderr)


def test_a_client_given_a_token_needs_no_secret(tmp_path: Path) -> None:
    port = free_port()  # nobody listens: the command fails on the connection, not on the secret
    done = mqchat(
        "send",
        "--user",
        "a",
        "--device",
        "d",
        "--to",
        "b",
        "--body",
        "x",
        "--token",
        "t",
        "--mqtt-port",
        str(port),
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}" in one_line(done.stderr)
    assert not (tmp_path / "data").exists()


# --- the tour --------------------------------------------------------------------------------------


def tour_commands() -> list[str]:
    """The shell block of the README's tour, as commands (continuation lines joined)."""
    text = README.read_text()
    section = text[text.index("## A 60-second tour") :]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the README tour has no sh block"
    commands: list[str] = []
    pending = ""
    for line in block.group(1).splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        commands.append(pending.strip())
        pending = ""
    return commands


@pytest.fixture
def make_serve(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """`mqchat serve` as `make serve` runs it: its own folder, default data dir, generated secret."""
    home = tmp_path / "checkout"
    home.mkdir()
    log = tmp_path / "serve.log"
    with serve_in(home, log) as (proc, mqtt_port, http_port):
        yield home, mqtt_port, http_port
    startup = log.read_text()
    assert proc.returncode == 0, startup
    assert "Traceback" not in startup, startup
    assert not re.search(r"deprecat|warning:", startup, re.IGNORECASE), startup
    assert "mqchat: mqchat" not in startup, startup


def wait_subscribed(http_port: int, at_least: int) -> None:
    """Until the broker holds at_least subscriptions (its Prometheus gauge says so)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
        found = re.search(r"^mqchat_broker_subscriptions(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
        if found and float(found.group(1)) >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError("the tour's listener never subscribed")


@pytest.mark.skipif(not (shutil.which("mosquitto_sub") and shutil.which("curl")), reason="make test installs them")
def test_the_readme_tour_works_as_written(make_serve: tuple[Path, int, int], tmp_path: Path) -> None:
    home, mqtt_port, http_port = make_serve
    assert (home / "data" / "jwt_secret").is_file(), "serve generates its secret into ./data"
    script = ["set -eu"]
    for command in tour_commands():
        # The README's ports are the defaults; this server listens on free ones.
        command = command.replace("-p 1883", f"-p {mqtt_port}").replace(":8080", f":{http_port}")
        if command.endswith("&"):
            script.append(f"{command} echo $! > listener.pid")
            script.append(f"{sys.executable} -c 'import tests.test_first_run as t; t.wait_subscribed({http_port}, 2)'")
        else:
            words = command.split()
            # A blank line first: curl's output ends without a newline.
            script.append(f"echo; echo '>>> {' '.join(words[:2]) if words[0] == 'mqchat' else words[0]}'")
            script.append(command)
    (home / "tour.sh").write_text("\n".join(script) + "\n")
    env = repo_env() | {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # as after `. .venv/bin/activate`
        "PYTHONPATH": str(README.parent),
        "MQCHAT_MQTT_PORT": str(mqtt_port),
        "MQCHAT_HTTP_PORT": str(http_port),
    }
    # Output to files, not pipes: the background listener keeps its stdout open after bash exits.
    with (tmp_path / "tour.out").open("w") as out_file, (tmp_path / "tour.err").open("w") as err_file:
        try:
            done = subprocess.run(
                ["bash", "tour.sh"],
                cwd=home,
                env=env,
                input="typed in the chat\n",  # what a person types into `mqchat chat`, then Ctrl-D
                stdout=out_file,
                stderr=err_file,
                text=True,
                timeout=120,
            )
        finally:
            pid_file = home / "listener.pid"
            if pid_file.exists():
                stop_listener(int(pid_file.read_text()))
    out = (tmp_path / "tour.out").read_text()
    err = (tmp_path / "tour.err").read_text()
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    sections = dict(_sections(out))
    # 2-3: bob's stock listener printed alice's message, with its seq
    sub_lines = [line for line in out.splitlines() if line.startswith("u/bob/in ")]
    first = json.loads(sub_lines[0].split(" ", 1)[1])
    assert (first["type"], first["seq"], first["from"], first["body"]) == ("msg", 1, "alice", "Hi Bob!")
    # 4: history over HTTP
    history = json.loads(sections["curl"].splitlines()[0])
    assert [m["body"] for m in history["messages"]] == ["Hi Bob!"]
    # 5: the bundled client: an ack, then listen catches up on both messages, then a chat line
    ack = json.loads(sections["mqchat send"].splitlines()[0])
    assert (ack["type"], ack["seq"]) == ("ack", 2)
    listened = [json.loads(line) for line in sections["mqchat listen"].splitlines() if line.startswith("{")]
    assert [(m["seq"], m["body"]) for m in listened] == [(1, "Hi Bob!"), (2, "sent from the CLI")]
    assert "✓ seq 3" in sections["mqchat chat"]
    assert any('"body":"typed in the chat"' in line for line in sub_lines), "bob's listener saw the chat line"
    assert "chatting with bob" in err
    assert "Traceback" not in err


def _sections(out: str) -> Iterator[tuple[str, str]]:
    """The output of each foreground command, keyed by its program (and mqchat subcommand)."""
    name, lines = "", []
    for line in out.splitlines():
        if line.startswith(">>> "):
            if name:
                yield name, "\n".join(lines)
            name, lines = line[4:], []
        elif line and not line.startswith("u/bob/"):
            lines.append(line)
    if name:
        yield name, "\n".join(lines)


def stop_listener(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return


def test_a_refused_token_is_printed_once(make_serve: tuple[Path, int, int]) -> None:
    home, mqtt_port, _ = make_serve
    done = mqchat(
        "send",
        "--user",
        "alice",
        "--device",
        "a1",
        "--to",
        "bob",
        "--body",
        "x",
        "--token",
        "forged",
        "--mqtt-port",
        str(mqtt_port),
        cwd=home,
    )
    assert done.returncode == 1
    assert "refused the credentials" in one_line(done.stderr)


def test_mqchat_token_never_signs_without_the_servers_secret(tmp_path: Path) -> None:
    """MQCHAT_TOKEN in the environment (for send/listen/chat) does not let `mqchat token` sign
    with no secret at all."""
    done = mqchat("token", "--user", "alice", "--device", "a1", cwd=tmp_path, env={"MQCHAT_TOKEN": "x"})
    assert done.returncode == 2
    assert "no JWT secret found" in one_line(done.stderr)
