"""The web chat (clients/js/app) as `mqchat serve` serves it under /app, and in a real browser.

::

    test ──Playwright──▶ Debian's Chromium (headless; two contexts: alice, bob)
                             │ GET /app, POST /app/dev-token, /v1/* ──▶ mqchat serve (dev mode:
                             └ MQTT over WebSocket ───────────────────▶   its generated secret)

The browser tests use the committed build (clients/js/app/dist, which `make app` checks is
current) and Chromium from Debian (`make test` installs it): Playwright downloads no browser.
The routes themselves (files, caching, traversal, dev sign-in) are also checked in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.http import create_app
from bridge.http.webapp import DevTokens, MqttWebSocket, is_loopback_host
from mqchat.app import WEB_APP_DIR, built_web_app, dev_sign_in_open, dev_tokens
from mqchat.bench.processes import serve_command, wait_healthy
from mqchat.config import config_to_env, load_config
from mqchat.ports import free_port
from mqchat.tokens import TokenVerifier, issue_token
from storage.sqlite import SqliteMessageStore
from tests.helpers import repo_env

REPO = Path(__file__).resolve().parent.parent
# The browser test's screenshot, for a look after a run (ignored by git). docs/img/web-chat.png
# is a copy of it, made by hand when the chat's look changes.
SCREENSHOT = REPO / "artifacts" / "web-chat.png"
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
WAIT_MS = 5_000  # every browser wait is bounded by this


# --- the routes, in-process ------------------------------------------------------------------------


@pytest.fixture
def build(tmp_path: Path) -> Path:
    """A stand-in for the Vite build: index.html, a hashed asset, a file outside it, a dot-file."""
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text(
        '<!doctype html><script type="module" src="/app/assets/index-Ab12Cd34.js"></script>'
    )
    (dist / "assets" / "index-Ab12Cd34.js").write_text("console.log('hi')")
    (dist / "assets" / "index-Ab12Cd34.css").write_text("body{}")
    (dist / "logo.svg").write_text("<svg/>")
    (dist / ".env").write_text("SECRET=1")
    (tmp_path / "outside.txt").write_text("not the app's")
    (dist / "assets" / "link.js").symlink_to(tmp_path / "outside.txt")
    return dist


@contextlib.asynccontextmanager
async def api(tmp_path: Path, **options: Any) -> Any:
    async with await SqliteMessageStore.open(tmp_path / "s.sqlite3") as store:
        app = create_app(store=store, verifier=TokenVerifier(secret="s" * 40), **options)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost:8080") as http:
            yield http


async def test_the_build_is_served_with_its_types_and_caching(tmp_path: Path, build: Path) -> None:
    websocket = MqttWebSocket(ws_port=8081, wss_port=None, path="/mqtt")
    async with api(tmp_path, web_app_dir=build, mqtt_websocket=websocket) as http:
        for path in ("/app", "/app/"):
            index = await http.get(path)
            assert index.status_code == 200, path
            assert index.headers["content-type"] == "text/html; charset=utf-8"
            assert index.headers["cache-control"] == "no-cache", "a new build is seen at once"
            assert "default-src 'self'" in index.headers["content-security-policy"]
            assert index.text.startswith("<!doctype html>")
        script = await http.get("/app/assets/index-Ab12Cd34.js")
        assert script.headers["content-type"] == "text/javascript; charset=utf-8"
        assert script.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert script.headers["x-content-type-options"] == "nosniff"
        style = await http.get("/app/assets/index-Ab12Cd34.css")
        assert style.headers["content-type"] == "text/css; charset=utf-8"
        logo = await http.get("/app/logo.svg")
        assert (logo.headers["content-type"], logo.headers["cache-control"]) == ("image/svg+xml", "no-cache")
        again = await http.get("/app/assets/index-Ab12Cd34.js", headers={"If-None-Match": script.headers["etag"]})
        assert again.status_code == 304
        assert not again.content
        head = await http.head("/app/")
        assert head.status_code == 200
        settings = await http.get("/app/server.json")
        assert settings.json() == {"ws_port": 8081, "wss_port": None, "ws_path": "/mqtt", "dev_sign_in": False}
        for path in (
            "/app/missing.js",
            "/app/assets",  # a folder
            "/app/assets/",
            "/app/.env",  # a dot-file
            "/app/assets/link.js",  # a link out of the build
            "/app/%2e%2e/outside.txt",
            "/app/assets/%2e%2e/%2e%2e/outside.txt",
            "/app/..%2foutside.txt",
            "/app/assets%5c..%5c..%5coutside.txt",
            "/app/assets//index-Ab12Cd34.js",
            "/app/index.html%00.js",
        ):
            refused = await http.get(path)
            assert refused.status_code == 404, path
            assert refused.json()["error"] == "not_found", path
            assert "not the app's" not in refused.text


async def test_without_a_build_or_dev_mode_app_answers_404(tmp_path: Path, build: Path) -> None:
    async with api(tmp_path) as http:
        for path in ("/app", "/app/", "/app/index.html", "/app/server.json"):
            assert (await http.get(path)).status_code == 404, path
        assert (await http.post("/app/dev-token", json={"user": "alice", "device": "d"})).status_code == 404
    async with api(tmp_path, web_app_dir=build) as http:
        # The files are served, but a server with a configured secret mints no tokens (404, not 405).
        assert (await http.get("/app/")).status_code == 200
        closed = await http.post("/app/dev-token", json={"user": "alice", "device": "d"})
        assert closed.status_code == 404
        assert closed.json()["error"] == "not_found"
        assert (await http.get("/app/server.json")).json()["dev_sign_in"] is False
        assert "/app/dev-token" not in (await http.get("/openapi.json")).json()["paths"]


async def test_the_dev_sign_in_mints_short_lived_tokens(tmp_path: Path, build: Path) -> None:
    secret = "s" * 40
    async with api(tmp_path, web_app_dir=build, dev_tokens=DevTokens(secret=secret)) as http:
        signed = await http.post("/app/dev-token", json={"user": "alice", "device": "alice-web"})
        assert signed.status_code == 200, signed.text
        assert signed.headers["cache-control"] == "no-store", "no cache keeps a token"
        body = signed.json()
        assert (body["user"], body["device"], body["expires_in"]) == ("alice", "alice-web", 3600)
        identity = await TokenVerifier(secret=secret).verify(body["token"])
        assert (identity.user, identity.device) == ("alice", "alice-web")
        synced = await http.get("/v1/conversations", headers={"Authorization": f"Bearer {body['token']}"})
        assert synced.status_code == 200
        for bad in ({"user": "al ice", "device": "d"}, {"user": "alice"}, {"user": "a" * 65, "device": "d"}, []):
            refused = await http.post("/app/dev-token", json=bad)
            assert refused.status_code == 400, bad
            assert refused.json()["error"] == "bad_request"
        assert (await http.get("/app/server.json")).json()["dev_sign_in"] is True
        assert secret not in repr(DevTokens(secret=secret))


async def test_the_dev_sign_in_answers_loopback_names_only(tmp_path: Path, build: Path) -> None:
    """DNS rebinding: a page on another site, its name made to resolve to 127.0.0.1, reaches a
    dev server with its own name in Host (or Origin): as if the route did not exist."""
    alice = {"user": "alice", "device": "alice-web"}
    async with api(tmp_path, web_app_dir=build, dev_tokens=DevTokens(secret="s" * 40)) as http:
        for host in ("localhost", "127.0.0.1:8080", "127.1.2.3", "[::1]:8080", "LOCALHOST."):
            assert (await http.post("/app/dev-token", json=alice, headers={"Host": host})).status_code == 200, host
        for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example", "192.168.1.5", "", "[::]"):
            refused = await http.post("/app/dev-token", json=alice, headers={"Host": host})
            assert (refused.status_code, refused.json()["error"]) == (404, "not_found"), host
            assert "token" not in refused.json()
        refused = await http.post("/app/dev-token", json={"user": "al ice"}, headers={"Host": "evil.example"})
        assert refused.status_code == 404, "refused before the body is looked at"
        for origin in ("http://localhost:8080", "http://127.0.0.1:8080"):
            ok = await http.post("/app/dev-token", json=alice, headers={"Origin": origin})
            assert ok.status_code == 200, origin
        for origin in ("http://evil.example", "null"):
            refused = await http.post("/app/dev-token", json=alice, headers={"Origin": origin})
            assert refused.status_code == 404, origin


def test_loopback_hosts() -> None:
    for host in ("localhost", "127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost."):
        assert is_loopback_host(host), host
    for host in ("", "0.0.0.0", "::", "10.0.0.1", "example.com", "localhost.example.com", "128.0.0.1"):
        assert not is_loopback_host(host), host


def test_dev_mode_is_the_generated_secret_only(tmp_path: Path) -> None:
    """The secret that opens the dev sign-in is only the one the server generated into its data
    dir; a configured secret, a public key or a JWKS closes it; a child of `serve` learns it from
    its parent."""
    generated, _ = load_config({"data_dir": tmp_path}, {})
    assert generated.auth.secret_in_data_dir
    assert generated.auth.dev_secret
    assert dev_sign_in_open(generated), "the default host is 127.0.0.1"
    child, _ = load_config({}, config_to_env(generated))
    assert child.auth == generated.auth, "a child of serve opens it too"
    configured, _ = load_config({"data_dir": tmp_path}, {"MQCHAT_JWT_SECRET": "c" * 40})
    assert not configured.auth.dev_secret
    assert dev_tokens(configured) is None
    child, _ = load_config({}, config_to_env(configured))
    assert not child.auth.dev_secret
    (tmp_path / "file.toml").write_text(f'jwt_secret = "{"f" * 40}"\n')
    from_file, _ = load_config({"config": str(tmp_path / "file.toml"), "data_dir": tmp_path}, {})
    assert not from_file.auth.dev_secret
    keyed, _ = load_config({"data_dir": tmp_path}, {"MQCHAT_JWKS_URL": "https://id.example/jwks.json"})
    assert keyed.auth.secret_in_data_dir
    assert not keyed.auth.dev_secret, "tokens come from an identity provider"
    assert dev_tokens(keyed) is None


def on_network(config: Any, **changes: str) -> Any:
    return dataclasses.replace(config, network=dataclasses.replace(config.network, **changes))


async def test_the_dev_sign_in_is_closed_on_a_server_that_looks_like_production(tmp_path: Path, build: Path) -> None:
    """The generated secret is not enough: a host other than a loopback one, or TLS, closes the
    dev sign-in (404)."""
    generated, _ = load_config({"data_dir": tmp_path}, {})
    for host in ("127.0.0.1", "localhost", "::1"):
        assert dev_tokens(on_network(generated, host=host)) is not None, host
    closed = {
        "all interfaces": on_network(generated, host="0.0.0.0"),
        "all interfaces (IPv6)": on_network(generated, host="::"),
        "a LAN address": on_network(generated, host="192.168.1.5"),
        "a name": on_network(generated, host="chat.example.com"),
        "TLS": on_network(generated, tls_cert="server.pem", tls_key="server.key"),
    }
    for why, config in closed.items():
        assert not dev_sign_in_open(config), why
        async with api(tmp_path, web_app_dir=build, dev_tokens=dev_tokens(config)) as http:
            refused = await http.post("/app/dev-token", json={"user": "alice", "device": "alice-web"})
            assert (refused.status_code, refused.json()["error"]) == (404, "not_found"), why
            assert (await http.get("/app/server.json")).json()["dev_sign_in"] is False, why


async def test_dev_tokens_carry_the_configured_issuer_and_audience(tmp_path: Path) -> None:
    secret = "s" * 40
    config, _ = load_config(
        {"data_dir": tmp_path}, {"MQCHAT_JWT_ISSUER": "https://id.example", "MQCHAT_JWT_AUDIENCE": "mqchat"}
    )
    minted = dev_tokens(config)
    assert minted is not None
    minted = dataclasses.replace(minted, secret=secret)
    verifier = TokenVerifier(secret=secret, issuer="https://id.example", audience="mqchat")
    identity = await verifier.verify(minted.issue("alice", "alice-web"))
    assert (identity.user, identity.device) == ("alice", "alice-web")


# --- a real `mqchat serve` -------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    proc: subprocess.Popen[bytes]
    mqtt_port: int
    http_port: int
    ws_port: int
    data_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@contextlib.contextmanager
def serving(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """`python -m mqchat serve` with MQTT over WebSocket, as `make serve` runs it (its own
    generated secret unless env configures one)."""
    mqtt_port, http_port, ws_port = free_port(), free_port(), free_port()
    data_dir = tmp_path / "data"
    log = tmp_path / "serve.log"
    command = [*serve_command(mqtt_port=mqtt_port, http_port=http_port, data_dir=data_dir), "--ws-port", str(ws_port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            env=repo_env() | {"MQCHAT_PRESENCE_GRACE": "1s"} | (env or {}),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        assert wait_healthy(proc, http_port, limit_s=60), f"mqchat serve did not become healthy:\n{log.read_text()}"
        yield Server(proc, mqtt_port, http_port, ws_port, data_dir, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post_json(url: str, body: object) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_answers_dev_token_404_with_a_configured_secret(tmp_path: Path) -> None:
    with serving(tmp_path, env={"MQCHAT_JWT_SECRET": "c" * 40}) as server:
        status, body = post_json(f"{server.url}/app/dev-token", {"user": "alice", "device": "alice-web"})
        assert (status, body["error"]) == (404, "not_found")
        if built_web_app() is not None:
            with urllib.request.urlopen(f"{server.url}/app/server.json", timeout=10) as response:
                assert json.loads(response.read())["dev_sign_in"] is False
    assert "dev sign-in is closed" in server.log.read_text() or built_web_app() is None


def test_serve_in_dev_mode_signs_in_and_serves_the_build(tmp_path: Path) -> None:
    with serving(tmp_path) as server:
        status, body = post_json(f"{server.url}/app/dev-token", {"user": "alice", "device": "alice-web"})
        assert status == 200, body
        synced = httpx.get(f"{server.url}/v1/conversations", headers={"Authorization": f"Bearer {body['token']}"})
        assert synced.status_code == 200, "the token is good for the API"
        with urllib.request.urlopen(f"{server.url}/app/server.json", timeout=10) as response:
            settings = json.loads(response.read())
        assert settings == {"ws_port": server.ws_port, "wss_port": None, "ws_path": "/mqtt", "dev_sign_in": True}
        with urllib.request.urlopen(f"{server.url}/app/", timeout=10) as response:
            assert response.headers["Cache-Control"] == "no-cache"
            assert b'<div id="app">' in response.read()


# --- in the browser --------------------------------------------------------------------------------


def chromium_path() -> str:
    """Debian's Chromium; the test fails under CI without it (or Playwright), and is skipped elsewhere."""
    found = next((p for p in CHROMIUM_PATHS if os.access(p, os.X_OK)), None) or shutil.which("chromium")
    why = None
    if found is None:
        why = "Chromium is not installed (`make test` installs Debian's chromium)"
    else:
        try:
            import playwright  # noqa: F401
        except ImportError:
            why = "Playwright is not installed (the test extra: pip install -e '.[test]')"
    if why is None and built_web_app() is None:
        why = f"the web chat is not built in {WEB_APP_DIR} (`make app`)"
    if why is not None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    assert found is not None
    return found


@pytest.fixture
def browser() -> Iterator[Any]:
    executable = chromium_path()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def sign_in(browser: Any, server: Server, user: str, errors: list[str]) -> tuple[Any, Any]:
    """A fresh browser context (its own storage, like another phone) signed in as user; the
    page's uncaught errors go to errors."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1100, "height": 680}, locale="en-GB", timezone_id="UTC")
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.on("pageerror", lambda error: errors.append(f"{user}: {error}"))
    page.goto(f"{server.url}/app/")
    page.get_by_label("User").fill(user)
    page.get_by_label("Device").fill(f"{user}-web")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".topbar .status")).to_have_text("online")
    return context, page


def log_texts(page: Any) -> list[str]:
    texts: list[str] = page.locator(".log .msg .body").all_inner_texts()
    return texts


def test_two_people_chat_in_the_browser(tmp_path: Path, browser: Any) -> None:
    """alice and bob in two browser contexts: a message, its read tick, typing, presence; bob
    offline while alice sends three, back online: each arrives once, in order; a reload keeps
    the history; a screenshot of alice's chat is written as an artefact (the test's tmp dir and
    artifacts/web-chat.png)."""
    from playwright.sync_api import expect

    with serving(tmp_path) as server:
        errors: list[str] = []
        alice_context, alice = sign_in(browser, server, "alice", errors)
        bob_context, bob = sign_in(browser, server, "bob", errors)

        # alice opens a chat with bob and sends; it is acked (one tick).
        alice.get_by_label("Chat with").fill("bob")
        alice.get_by_role("button", name="Open").click()
        expect(alice.get_by_role("heading", name="bob")).to_be_visible()
        alice.get_by_label("Message", exact=True).fill("Hi Bob! Lunch at noon?")
        alice.get_by_role("button", name="Send", exact=True).click()
        first = alice.locator(".log .msg", has_text="Hi Bob! Lunch at noon?")
        expect(first.get_by_role("img", name="sent")).to_be_visible()

        # bob's device has it (two ticks), the conversation listed with one unread; he opens it
        # and alice's ticks turn "read".
        bob_item = bob.locator(".conv[data-conv='dm:alice:bob']")
        expect(bob_item.get_by_label("1 unread")).to_be_visible()
        expect(first.get_by_role("img", name="delivered")).to_be_visible()
        bob_item.click()
        expect(bob.locator(".log .msg .body")).to_have_text(["Hi Bob! Lunch at noon?"])
        expect(first.get_by_role("img", name="read")).to_be_visible()
        expect(bob_item.locator(".badge")).to_have_count(0)

        # bob types: alice sees it; bob sends: the indicator goes.
        bob.get_by_label("Message", exact=True).press_sequentially("Sure", delay=20)
        expect(alice.get_by_role("status").filter(has_text="bob is typing…")).to_be_visible()
        bob.get_by_label("Message", exact=True).press_sequentially(", see you there", delay=5)
        bob.get_by_label("Message", exact=True).press("Enter")
        expect(alice.locator(".log .msg .body")).to_have_text(["Hi Bob! Lunch at noon?", "Sure, see you there"])
        expect(alice.locator(".typing")).to_have_text("")
        expect(alice.locator(".conv-subtitle")).to_have_text("online")

        # bob goes offline; alice sends three; bob comes back and catches up, once and in order.
        bob_context.set_offline(True)
        expect(bob.locator(".topbar .status")).to_have_text("offline")
        expect(alice.locator(".conv-subtitle")).to_contain_text("last seen")
        for text in ("one", "two", "three"):
            alice.get_by_label("Message", exact=True).fill(text)
            alice.get_by_label("Message", exact=True).press("Enter")
        three = alice.locator(".log .msg", has_text="three")
        expect(three.get_by_role("img", name="sent")).to_be_visible()
        time.sleep(0.5)  # long enough for a message to reach bob's page, were it still connected
        expect(bob.locator(".log .msg .body")).to_have_text(["Hi Bob! Lunch at noon?", "Sure, see you there"])
        bob_context.set_offline(False)
        expect(bob.locator(".topbar .status")).to_have_text("online")
        everything = ["Hi Bob! Lunch at noon?", "Sure, see you there", "one", "two", "three"]
        expect(bob.locator(".log .msg .body")).to_have_text(everything)
        expect(three.get_by_role("img", name="read")).to_be_visible()
        expect(alice.locator(".conv-subtitle")).to_have_text("online")

        # A reload keeps the sign-in and the history (from the server), each message once.
        bob.reload()
        expect(bob.locator(".topbar .status")).to_have_text("online")
        bob.locator(".conv[data-conv='dm:alice:bob']").click()
        expect(bob.locator(".log .msg .body")).to_have_text(everything)
        assert log_texts(bob) == everything

        alice.get_by_label("Message", exact=True).fill("Booked a table for two")
        alice.get_by_role("button", name="Send", exact=True).click()
        expect(bob.locator(".log .msg .body").last).to_have_text("Booked a table for two")
        expect(alice.locator(".log .msg").last.get_by_role("img", name="read")).to_be_visible()
        bob.get_by_label("Message", exact=True).press_sequentially("Great", delay=20)
        expect(alice.get_by_role("status").filter(has_text="bob is typing…")).to_be_visible()

        shot = tmp_path / "web-chat.png"
        alice.screenshot(path=str(shot))
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
        assert shot.stat().st_size > 10_000
        alice_context.close()
        bob_context.close()
    assert not errors, "uncaught errors in the pages"


def test_hostile_text_shows_as_text_in_the_browser(tmp_path: Path, browser: Any) -> None:
    """A group name and a message body that are HTML show as text: no element is made from them,
    no script runs. Signing in again in the same browser keeps the user's device id."""
    from playwright.sync_api import expect

    hostile = "<img src=x onerror=alert(1)>"
    with serving(tmp_path) as server:
        errors: list[str] = []
        alice_context, alice = sign_in(browser, server, "alice", errors)
        bob_context, bob = sign_in(browser, server, "bob", errors)
        dialogs: list[str] = []
        for page in (alice, bob):
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

        alice.get_by_text("New group").click()
        alice.get_by_label("Group name").fill(hostile)
        alice.get_by_label("Members").fill("bob")
        alice.get_by_role("button", name="Create group").click()
        expect(alice.get_by_role("heading", name=hostile)).to_be_visible()
        alice.get_by_label("Message", exact=True).fill(hostile)
        alice.get_by_role("button", name="Send", exact=True).click()
        group = bob.locator(".conv", has_text=hostile)
        group.click()
        expect(bob.get_by_role("heading", name=hostile)).to_be_visible()
        expect(bob.locator(".log .msg .body")).to_have_text([hostile])
        expect(alice.locator(".log .msg .body")).to_have_text([hostile])
        time.sleep(0.3)  # time for an onerror to fire, were there an element
        for page in (alice, bob):
            assert page.locator("img[src='x']").count() == 0
            assert page.evaluate("document.querySelectorAll('img[onerror]').length") == 0
        assert not dialogs, "a script from the text ran"

        # Another tab of alice's browser: her user and device id are offered again.
        again = alice_context.new_page()
        again.goto(f"{server.url}/app/")
        expect(again.get_by_label("User")).to_have_value("alice")
        expect(again.get_by_label("Device")).to_have_value("alice-web")
        again.get_by_label("User").fill("carol")
        expect(again.get_by_label("Device")).to_have_value(re.compile(r"^web-[0-9a-f]{16}$"))
        alice_context.close()
        bob_context.close()
    assert not errors, "uncaught errors in the pages"


def test_groups_and_scrollback_in_the_browser(tmp_path: Path, browser: Any) -> None:
    """alice creates a group with bob; bob's message shows with his name; a conversation longer
    than what the sync brings scrolls back page by page to its first message."""
    from playwright.sync_api import expect

    from clients.blocking import BlockingChatClient

    with serving(tmp_path) as server:
        errors: list[str] = []
        alice_context, alice = sign_in(browser, server, "alice", errors)
        bob_context, bob = sign_in(browser, server, "bob", errors)

        alice.get_by_text("New group").click()
        alice.get_by_label("Group name").fill("Lunch crew")
        alice.get_by_label("Members").fill("bob")
        alice.get_by_role("button", name="Create group").click()
        expect(alice.get_by_role("heading", name="Lunch crew")).to_be_visible()
        expect(alice.locator(".conv-subtitle")).to_contain_text("2 members: alice, bob")
        group = bob.locator(".conv", has_text="Lunch crew")
        group.click()
        expect(bob.get_by_role("heading", name="Lunch crew")).to_be_visible()
        bob.get_by_label("Message", exact=True).fill("Hello group")
        bob.get_by_label("Message", exact=True).press("Enter")
        from_bob = alice.locator(".log .msg", has_text="Hello group")
        expect(from_bob.locator(".from")).to_have_text("bob")
        expect(bob.locator(".log .msg", has_text="Hello group").get_by_role("img", name="read")).to_be_visible()

        # 80 messages from carol (a script, through the Python SDK): the sync brings the newest
        # 50; "Load earlier messages" brings the rest, down to the first.
        secret = (server.data_dir / "jwt_secret").read_text().strip()
        token = issue_token(secret=secret, user="carol", device="carol-script", ttl_s=600)
        with BlockingChatClient(
            host="127.0.0.1", port=server.mqtt_port, user="carol", device="carol-script", token=token
        ) as carol:
            for n in range(1, 81):
                carol.send("dm:bob:carol", f"note {n}")
        bob.reload()  # what bob's device holds of it now comes from the sync: its newest 50
        item = bob.locator(".conv[data-conv='dm:bob:carol']")
        expect(item.get_by_label("80 unread")).to_be_visible()
        item.click()
        expect(bob.locator(".log .msg .body").last).to_have_text("note 80")
        earlier = bob.get_by_role("button", name="Load earlier messages")
        for _ in range(3):
            if not earlier.is_visible():
                break
            earlier.click()
            time.sleep(0.2)
        expect(bob.locator(".log .msg .body").first).to_have_text("note 1")
        assert log_texts(bob) == [f"note {n}" for n in range(1, 81)]
        alice_context.close()
        bob_context.close()
    assert not errors, "uncaught errors in the pages"
