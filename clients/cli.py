"""``mqchat chat | send | listen | download``: the SDK's command-line entry points.

Each is an async function with keyword-only arguments returning a process exit code; the
argparse side lives in ``mqchat/cli.py``. Output is for people (``chat``) or one JSON envelope
per line (``send``, ``listen``, ``download``), flushed at once so that pipes see it; the progress
of a transfer goes to stderr.

::

    chat      stdin thread ─► lines queue ─► ChatClient.send ─► outbox ─► MQTT
              ChatClient.events() ─► "[HH:MM:SS] from: body" / "✓ seq N" on stdout
    send      ChatClient.send_and_wait ─► ack JSON on stdout (0) | error JSON on stderr (1) | timeout (2)
              --file: ChatClient.send_file (resumable upload, progress on stderr) ─► wait_acked ─► the same
    listen    (catch-up over HTTP, then) ChatClient.events() ─► one JSON envelope per line, until count or
              timeout (0)
    download  MediaClient.download (Range resumes, progress on stderr) ─► {"id", "path", "size"} (0)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from clients.aio import ChatClient, backoff_delay
from clients.errors import ClientError, SendFailed
from clients.events import Ack, ErrorReply, Message
from clients.media import MediaClient
from mqchat.ids import dm_conv, is_valid_id

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 2
DRAIN_TIMEOUT = 10.0  # how long chat waits for the acks of what was typed before EOF
PROGRESS_STEP = 5  # percent between two progress lines of a transfer
PROGRESS_MIN_BYTES = 1024 * 1024  # smaller transfers print no progress
HTTP_TIMEOUT = 10.0  # each HTTP request of download, and each chunk of its body


def _json_line(envelope: dict[str, Any]) -> str:
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))


def _clock_time(ts_ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts_ms / 1000))


def _fail(message: str) -> None:
    print(f"mqchat: {message}", file=sys.stderr, flush=True)


def _start_stdin_reader(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
    """Read stdin on a daemon thread (a blocked read cannot be cancelled) into ``lines``; None = EOF."""

    def put(item: str | None) -> bool:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

    def pump() -> None:
        try:
            for line in sys.stdin:
                if not put(line):
                    return
        finally:
            put(None)

    threading.Thread(target=pump, name="mqchat-chat:stdin", daemon=True).start()


class _ProgressLines:
    """A transfer's progress as a stderr line every PROGRESS_STEP percent (none for small files)."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._shown = -1

    def __call__(self, done: int, total: int) -> None:
        if total < PROGRESS_MIN_BYTES:
            return
        step = done * 100 // total // PROGRESS_STEP * PROGRESS_STEP
        if step <= self._shown:
            return  # also after a resume from an earlier offset: no line goes backwards
        self._shown = step
        mib = 1024 * 1024
        print(f"mqchat: {self._what} {step}% ({done / mib:.1f} of {total / mib:.1f} MiB)", file=sys.stderr, flush=True)


class _ChatState:
    def __init__(self) -> None:
        self.failures: list[ClientError] = []
        self.answered: set[str] = set()  # sends whose ack or error was printed
        self.progress = asyncio.Condition()


async def _print_chat_events(client: ChatClient, conv: str, state: _ChatState) -> None:
    try:
        async for event in client.events():
            if isinstance(event, Message):
                if event.sender == client.user and event.device == client.device:
                    continue  # the echo of our own send: its ack line says enough
                where = "" if event.conv == conv else f" ({event.conv})"
                print(f"[{_clock_time(event.ts)}] {event.sender}{where}: {event.body}", flush=True)
            elif isinstance(event, Ack):
                print(f"✓ seq {event.seq}", flush=True)
            elif isinstance(event, ErrorReply):
                print(f"✗ {event.code}: {event.message}", file=sys.stderr, flush=True)
            if isinstance(event, Ack | ErrorReply) and event.id is not None:
                async with state.progress:
                    state.answered.add(event.id)
                    state.progress.notify_all()
    except ClientError as exc:  # the connection ended for good
        async with state.progress:
            state.failures.append(exc)
            state.progress.notify_all()


async def chat(*, host: str, port: int, user: str, device: str, token: str, peer: str) -> int:
    """Interactive 1:1 chat with ``peer``: each stdin line is sent; EOF (Ctrl-D) exits 0.

    At EOF it waits up to DRAIN_TIMEOUT s for the acks of what was sent, so piped input is
    delivered before it exits.
    """
    try:
        conv = dm_conv(user, peer)
    except ValueError as exc:
        _fail(str(exc))
        return EXIT_FAILED
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    state = _ChatState()
    try:
        async with ChatClient(host=host, port=port, user=user, device=device, token=token) as client:
            print(f"chatting with {peer} ({conv}); Ctrl-D to quit", file=sys.stderr, flush=True)
            async with asyncio.TaskGroup() as tg:
                printer = tg.create_task(_print_chat_events(client, conv, state), name="mqchat-chat:events")
                printer.add_done_callback(lambda _: lines.put_nowait(None))  # stop reading on failure
                _start_stdin_reader(asyncio.get_running_loop(), lines)
                sent: set[str] = set()
                while (line := await lines.get()) is not None:
                    text = line.rstrip("\r\n")
                    if not text.strip():
                        continue
                    try:
                        sent.add(await client.send(conv, text))
                    except ClientError as exc:
                        state.failures.append(exc)
                        break
                if not state.failures:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DRAIN_TIMEOUT), state.progress:
                            await state.progress.wait_for(lambda: sent <= state.answered or bool(state.failures))
                printer.cancel()
    except ClientError as exc:
        state.failures.append(exc)
    if state.failures:
        _fail(str(state.failures[0]))
        return EXIT_FAILED
    return EXIT_OK


async def send(
    *,
    host: str,
    port: int,
    user: str,
    device: str,
    token: str,
    conv: str,
    body: str,
    timeout: float,  # noqa: ASYNC109
    file: Path | None = None,
    http_url: str | None = None,
    state_path: Path | None = None,
) -> int:
    """Send one message and print its ack as a JSON line (0); error reply on stderr (1); timeout (2).

    With ``file`` it first uploads the file over ``http_url`` (resuming after cuts, progress on
    stderr; with ``state_path`` an upload an earlier run left unfinished is carried on) and sends
    it as a media message with ``body`` as its caption; ``timeout`` then bounds the wait for the
    ack once the upload is done."""
    try:
        if file is None:
            async with asyncio.timeout(timeout):
                async with ChatClient(host=host, port=port, user=user, device=device, token=token) as client:
                    ack = await client.send_and_wait(conv, body, timeout=None)
        else:
            async with ChatClient(
                host=host, port=port, user=user, device=device, token=token, http_url=http_url, state_path=state_path
            ) as client:
                msg_id = await client.send_file(conv, file, caption=body, progress=_ProgressLines("upload"))
                ack = await client.wait_acked(msg_id, timeout=timeout)
    except SendFailed as exc:
        print(_json_line(exc.reply.envelope()), file=sys.stderr, flush=True)
        return EXIT_FAILED
    except TimeoutError:
        _fail(f"no ack within {timeout:g} s")
        return EXIT_TIMEOUT
    except (ClientError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
        return EXIT_FAILED
    except OSError as exc:  # the file cannot be read
        _fail(f"cannot read {file}: {exc.strerror or exc}")
        return EXIT_FAILED
    print(_json_line(ack.envelope()), flush=True)
    return EXIT_OK


async def download(*, http_url: str, token: str, media_id: str, out: Path, timeout: float = HTTP_TIMEOUT) -> int:  # noqa: ASYNC109
    """Download a file to ``out`` (through ``out.part``: a run cut short is carried on by the next),
    progress on stderr, then print {"id", "path", "size"} as a JSON line (0); a failure (1)."""
    if not is_valid_id(media_id):
        _fail("--id must be a media id (1-64 characters of [A-Za-z0-9_.@-])")
        return EXIT_FAILED
    rng = random.Random()
    try:
        async with httpx.AsyncClient(base_url=http_url, timeout=timeout) as http:
            media = MediaClient(
                http=http,
                token=token,
                timeout=timeout,
                sleep=asyncio.sleep,
                backoff=lambda attempt: backoff_delay(attempt, rng=rng),
            )
            path = await media.download(media_id, out, progress=_ProgressLines("download"))
            size = path.stat().st_size
    except ClientError as exc:
        _fail(str(exc))
        return EXIT_FAILED
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or exc}")
        return EXIT_FAILED
    print(_json_line({"id": media_id, "path": str(path), "size": size}), flush=True)
    return EXIT_OK


async def listen(
    *,
    host: str,
    port: int,
    user: str,
    device: str,
    token: str,
    count: int | None,
    timeout: float | None,  # noqa: ASYNC109
    http_url: str | None = None,
    state_path: Path | None = None,
) -> int:
    """Print each incoming event as one JSON line until ``count`` events or ``timeout`` s (0).

    With ``http_url`` it first catches up over the sync endpoint, as an app does after every
    connect: messages that arrived while it was not running come first, each conversation in seq
    order (from the start of its history, or after what ``state_path`` remembers as shown)."""
    seen = 0
    try:
        async with ChatClient(
            host=host, port=port, user=user, device=device, token=token, http_url=http_url, state_path=state_path
        ) as client:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while count is None or seen < count:
                        event = await anext(client.events(), None)
                        if event is None:
                            break
                        print(_json_line(event.envelope()), flush=True)
                        seen += 1
    except ClientError as exc:
        _fail(str(exc))
        return EXIT_FAILED
    return EXIT_OK
