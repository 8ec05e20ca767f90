"""`mqchat deploy haproxy`: a configuration HAProxy itself accepts, and clear refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqchat.deploy import haproxy_config, parse_node_address
from tests.cluster import haproxy_binary
from tests.helpers import repo_env


def mqchat_deploy(target: str, *args: str, secret: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqchat", "deploy", target, *args],
        env=repo_env() | ({"MQCHAT_JWT_SECRET": secret} if secret else {}),
        capture_output=True,
        text=True,
        timeout=60,
    )


def deploy(*args: str) -> subprocess.CompletedProcess[str]:
    return mqchat_deploy("haproxy", *args)


def test_the_generated_configuration_is_valid_for_haproxy(tmp_path: Path) -> None:
    done = deploy("--node", "n1=10.0.0.1:1883:8080", "--node", "n2=[fd00::2]:1883:8080", "--check-interval", "500ms")
    assert done.returncode == 0, done.stderr
    config = tmp_path / "haproxy.cfg"
    config.write_text(done.stdout)
    checked = subprocess.run([haproxy_binary(), "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Each node's MQTT server is checked on its HTTP port, and closed when marked down.
    assert "server n1 10.0.0.1:1883 check inter 500ms fall 2 rise 2 port 8080 on-marked-down shutdown-sessions" in (
        done.stdout
    )
    assert "server n2 [fd00::2]:8080 check inter 500ms fall 2 rise 2" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--node", "n1=10.0.0.1:1883"], "is not NAME=HOST:MQTT_PORT:HTTP_PORT"),
        (["--node", "n1=10.0.0.1:1883:99999"], "ports from 1 to 65535"),
        (["--node", "_x=10.0.0.1:1883:8080"], "is not a node id"),
        (["--node", "n1=a b:1:2"], "is not NAME=HOST:MQTT_PORT:HTTP_PORT"),
        (["--node", "n1=h:1:2", "--node", "n1=g:1:2"], "node names must differ"),
        (["--node", "n1=h:1:2", "--check-interval", "soon"], "not a duration"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(args: list[str], message: str) -> None:
    done = deploy(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert message in done.stderr
    assert done.stderr.startswith("mqchat: "), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=60))
def test_any_text_is_a_node_address_or_a_value_error(text: str) -> None:
    try:
        node = parse_node_address(text)
    except ValueError:
        return
    assert node == parse_node_address(f"{node.name}={node.host}:{node.mqtt_port}:{node.http_port}")
    # Nothing that could end a line or a word of the configuration gets into it.
    assert not any(c.isspace() or c == "#" for c in node.name + node.host)
    assert haproxy_config([node]).count("\n    server ") == 2


def test_the_emqx_settings_name_the_hooks_and_the_service_credential() -> None:
    from mqchat.tokens import hooks_credential

    secret = "0123456789abcdefghijklmnopqrstuv"
    done = mqchat_deploy("emqx", "--url", "http://10.0.0.5:8080/", secret=secret)
    assert done.returncode == 0, done.stderr
    assert 'url = "http://10.0.0.5:8080/hooks/emqx/authn"' in done.stdout
    assert 'url = "http://10.0.0.5:8080/hooks/emqx/authz"' in done.stdout
    assert f'"authorization" = "Bearer {hooks_credential(secret)}"' in done.stdout
    assert "no_match = deny" in done.stdout
    refused = mqchat_deploy("emqx", "--url", 'http://x" }\nauthorization {', secret=secret)
    assert refused.returncode == 2
    assert "is not an http(s)://HOST[:PORT][/PATH] URL" in refused.stderr


@pytest.mark.parametrize(
    ("args", "users", "message"),
    [
        (["--bind", "0.0.0.0\nallow_anonymous true"], "", "is not an address to listen on"),
        (["--run-as", "root\nuser x"], "", "is not an account name"),
        ([], "alice=pw\nalice=pw2\n", "alice appears twice"),
        ([], "$mqchat-service=pw\n", "is not a user id"),
        ([], "alice\n", "not NAME=PASSWORD"),
    ],
)
def test_the_mosquitto_files_refuse_what_would_change_their_meaning(
    tmp_path: Path, args: list[str], users: str, message: str
) -> None:
    listed = tmp_path / "users"
    listed.write_text(users)
    done = mqchat_deploy("mosquitto", "--dir", str(tmp_path / "conf"), "--users", str(listed), *args, secret="k" * 32)
    assert done.returncode == 2
    assert message in done.stderr, done.stderr
    assert not (tmp_path / "conf" / "mosquitto.conf").exists(), "nothing written"


def test_haproxy_binds_are_checked() -> None:
    done = deploy("--node", "n1=h:1:2", "--mqtt-bind", ":1883\nlisten evil")
    assert done.returncode == 2
    assert "is not an address to bind" in done.stderr
