"""A single-node Cassandra 5 for tests and local development, run from Maven Central's jars.

::

    fetch()  ──mvn dependency:copy-dependencies (pom.xml)──▶  <cache>/5.0.8/lib/*.jar   once (stamp)

    CassandraNode(directory=…, port=…)
      start()   writes conf/cassandra.yaml + conf/logback.xml ──▶ java … CassandraDaemon (lib/*)
                ready when logs/system.log says "Starting listening for CQL clients" and
                "Startup complete" and a TCP connect to the CQL port succeeds (bounded:
                START_TIMEOUT_S); a port in use is refused before the JVM starts
      stop()    SIGTERM (Cassandra drains), then SIGKILL
      kill()    SIGKILL: a crash, for recovery tests (the commit log is replayed on start)
      restart() the same ports and data directory: the data survives

    python -m storage.cassandra.devnode fetch
    python -m storage.cassandra.devnode run [--dir data/cassandra] [--port 9042]

The cache is ``$MQCHAT_CASSANDRA_HOME`` or ``~/.cache/mqchat/cassandra``; the server's version is
named once, in ``pom.xml``. Cassandra 5.0 needs Java 17 (``find_java``): it fails on 21 to 23
without extra flags and can never run on 24 or later. Everything else the node writes (yaml,
logs, data, commit log) lives in its directory, which only its owner can read.

This is a development and test server: one node, no authentication, loopback only. It is not
how a production cluster is run. Standard library only: the Cassandra driver is not needed here.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Literal, Self

from mqchat.errors import MqchatError
from mqchat.ports import free_port
from storage.files import private_dir

__all__ = [
    "START_TIMEOUT_S",
    "CassandraNode",
    "DevNodeError",
    "Java",
    "cassandra_version",
    "default_cache_dir",
    "fetch",
    "find_java",
    "main",
]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
# "Starting listening" is logged before the CQL port is bound, "Startup complete" only once it
# is: a port someone else holds would answer a TCP connect, and the start fails after the first.
READY_MARKERS = (b"Starting listening for CQL clients", b"Startup complete")
JAVA_FEATURE = 17  # Cassandra 5.0 supports 11 and 17; the JVM options below are those for 17
POM = Path(__file__).with_name("pom.xml")
_MAVEN_NS = {"m": "http://maven.apache.org/POM/4.0.0"}
_PROGRESS_EVERY_S = 15.0


class DevNodeError(MqchatError):
    """The dev/test Cassandra node cannot be fetched or started (what is missing is named)."""


# --- the jars ------------------------------------------------------------------------------------


@cache
def cassandra_version() -> str:
    """The Cassandra release pom.xml depends on (its ``cassandra.version`` property)."""
    version = ET.parse(POM).findtext("m:properties/m:cassandra.version", namespaces=_MAVEN_NS)
    if not version:
        raise DevNodeError(f"{POM} names no cassandra.version property")
    return version.strip()


def default_cache_dir() -> Path:
    """``$MQCHAT_CASSANDRA_HOME``, else ``~/.cache/mqchat/cassandra``."""
    configured = os.environ.get("MQCHAT_CASSANDRA_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mqchat" / "cassandra"


def fetch(cache_dir: Path | None = None) -> Path:
    """The directory of Cassandra's jars, downloaded by Maven the first time.

    Maven resolves pom.xml into ``~/.m2`` and copies the jars into ``<cache>/<version>/lib``. A
    stamp holding pom.xml's digest marks a complete copy: later calls only read it, and a changed
    pom.xml fetches again. Concurrent callers wait for each other on a lock file.
    """
    root = (cache_dir or default_cache_dir()) / cassandra_version()
    lib, stamp = root / "lib", root / "fetched"
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    if _stamped(stamp, digest):
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise DevNodeError(
            "Maven (mvn) is not installed: it fetches Cassandra's jars from Maven Central once. "
            "Install the Debian package maven (`make system-deps` does)."
        )
    java = find_java()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if _stamped(stamp, digest):
            return lib  # another process fetched them while this one waited
        partial = root / "lib.partial"
        shutil.rmtree(partial, ignore_errors=True)
        logger.info("fetching Cassandra %s with Maven into %s (once; about 70 MB)", cassandra_version(), lib)
        command = [
            mvn, "-B", "-q", "-f", str(POM), "dependency:copy-dependencies",
            "-DincludeScope=runtime", f"-DoutputDirectory={partial}",
        ]  # fmt: skip
        done = subprocess.run(
            command,
            cwd=root,
            env={**os.environ, "JAVA_HOME": str(java.home)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
        if done.returncode != 0:
            output = _tail(done.stdout + done.stderr, 30)
            raise DevNodeError(
                f"mvn could not fetch Cassandra {cassandra_version()} (status {done.returncode}):\n{output}"
            )
        shutil.rmtree(lib, ignore_errors=True)
        partial.rename(lib)
        stamp.write_text(digest + "\n")
    return lib


def _stamped(stamp: Path, digest: str) -> bool:
    try:
        return stamp.read_text().strip() == digest
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- Java ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Java:
    binary: Path
    feature: int  # the feature release: 17 for "17.0.15"

    @property
    def home(self) -> Path:
        return self.binary.resolve().parent.parent


_JAVA_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?')


def _java_feature(binary: Path) -> int | None:
    try:
        done = subprocess.run(
            [str(binary), "-version"], capture_output=True, text=True, errors="replace", timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = _JAVA_VERSION.search(done.stderr + done.stdout)
    if found is None:
        return None
    feature = int(found[1])
    return int(found[2]) if feature == 1 and found[2] else feature  # "1.8.0" is Java 8


def find_java() -> Java:
    """A Java 17: ``$JAVA_HOME``'s, else the ``java`` on PATH, else one under /usr/lib/jvm."""
    candidates: list[Path] = []
    if java_home := os.environ.get("JAVA_HOME"):
        candidates.append(Path(java_home) / "bin" / "java")
    if on_path := shutil.which("java"):
        candidates.append(Path(on_path))
    candidates.extend(sorted(Path("/usr/lib/jvm").glob("*/bin/java")))
    seen: dict[Path, str] = {}  # the real file (/usr/bin/java is a chain of links): what was found
    for binary in candidates:
        if not binary.is_file() or binary.resolve() in seen:
            continue
        feature = _java_feature(binary)
        if feature == JAVA_FEATURE:
            return Java(binary=binary, feature=feature)
        seen[binary.resolve()] = f"{binary} (Java {feature or '?'})"
    found = f"found only {', '.join(seen.values())}" if seen else "found no java"
    raise DevNodeError(
        f"Cassandra {cassandra_version()} needs Java {JAVA_FEATURE}; {found}. Install the Debian package "
        f"openjdk-{JAVA_FEATURE}-jre-headless (`make system-deps` does), or set JAVA_HOME to a JDK {JAVA_FEATURE}."
    )


# --- what the node runs with --------------------------------------------------------------------

# apache/cassandra conf/jvm-server.options and conf/jvm17-server.options (cassandra-5.0), less
# -XX:+AlwaysPreTouch (touches the whole heap: a slow start), -XX:+UseNUMA (a test box has one
# node), -XX:-UseBiasedLocking (off by default since JDK 15, where the flag only adds a deprecation
# warning) and -XX:+HeapDumpOnOutOfMemoryError (a dev node exits instead:
# -XX:+ExitOnOutOfMemoryError, one of cassandra-env.sh's choices).
JVM_OPTIONS: tuple[str, ...] = (
    # jvm-server.options
    "-ea",
    "-da:net.openhft...",
    "-XX:+UseThreadPriorities",
    "-Xss256k",
    "-XX:+UseTLAB",
    "-XX:+ResizeTLAB",
    "-XX:+PerfDisableSharedMem",
    "-Djava.net.preferIPv4Stack=true",
    "-XX:+ExitOnOutOfMemoryError",
    # jvm17-server.options: G1
    "-XX:+UseG1GC",
    "-XX:+ParallelRefProcEnabled",
    "-XX:MaxTenuringThreshold=1",
    "-XX:G1HeapRegionSize=16m",
    "-XX:G1RSetUpdatingPauseTimePercent=5",
    "-XX:MaxGCPauseMillis=300",
    "-XX:InitiatingHeapOccupancyPercent=70",
    # jvm17-server.options: the module system (without these the JVM dies at start-up)
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports", "java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports", "java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports", "java.sql/java.sql=ALL-UNNAMED",
    "--add-exports", "java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports", "jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports", "jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports", "jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens", "jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens", "java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens", "java.base/java.io=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens", "jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang=ALL-UNNAMED",
    "--add-opens", "java.base/java.util=ALL-UNNAMED",
    # jvm17-server.options: Netty
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
    # A faster start of a lone node: no wait for gossip to settle, its one token given. Not
    # -Dcassandra.unsafesystem=true: it skips flushing schema changes, so after a kill the commit
    # log's writes to tables created since the start are dropped as writes to unknown tables.
    "-Dcassandra.skip_wait_for_gossip_to_settle=0",
    "-Dcassandra.initial_token=0",
    # A lone node has no peer to tell that it is shutting down: no 2 s wait for them to hear it.
    "-Dcassandra.shutdown_announce_in_ms=0",
    "-Dcassandra-foreground=yes",
)  # fmt: skip

CommitlogSync = Literal["batch", "group", "periodic"]

_COMMITLOG_SYNC: dict[str, str] = {
    "batch": """\
# Every write is fsynced to the commit log before it is acknowledged: a write a client saw
# succeed survives kill -9 of this node (what crash tests expect of one replica).
commitlog_sync: batch""",
    "group": """\
# Writes wait for the next of the commit log's fsyncs, one every 5 ms, which serves every write
# that arrived meanwhile: as durable as batch (nothing is acknowledged before its fsync), with
# one fsync per group instead of one per write.
commitlog_sync: group
commitlog_sync_group_window: 5ms""",
    "periodic": """\
# Cassandra's default: writes are acknowledged at once, the commit log fsynced every 10 s. Replay
# stops at the last sync, so kill -9 of this node loses up to the last 10 s of writes (a
# cluster relies on its other replicas for them).
commitlog_sync: periodic
commitlog_sync_period: 10s""",
}

_YAML = """\
# Written by storage/cassandra/devnode.py at every start: edits here are overwritten.
# A single dev/test node on loopback; every key is one Cassandra {version} accepts.
cluster_name: {cluster_name}
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
# SimpleSnitch puts the node in datacenter "datacenter1", rack "rack1" (NetworkTopologyStrategy works).
endpoint_snitch: SimpleSnitch
num_tokens: 1
listen_address: {host}
rpc_address: {host}
storage_port: {storage_port}
native_transport_port: {port}
start_native_transport: true
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{host}"
data_file_directories:
  - {data}
commitlog_directory: {commitlog}
saved_caches_directory: {saved_caches}
hints_directory: {hints}
cdc_raw_directory: {cdc_raw}
{commitlog_sync}
auto_snapshot: false
memtable_allocation_type: heap_buffers
# Paxos v2: two round trips per lightweight transaction instead of four.
paxos_variant: v2
# The store writes a conversation's messages as one single-partition conditional batch, kept
# under ~48 KiB of bodies unless one message alone is larger (envelopes go up to 64 KiB): quiet
# up to one such message with its index rows, refused only far beyond (defaults: 5 and 50 KiB).
batch_size_warn_threshold: 128KiB
batch_size_fail_threshold: 640KiB
"""

_LOGBACK = """\
<!-- Written by storage/cassandra/devnode.py at every start: edits here are overwritten. -->
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.rolling.RollingFileAppender">
    <file>{log}</file>
    <rollingPolicy class="ch.qos.logback.core.rolling.FixedWindowRollingPolicy">
      <fileNamePattern>{log}.%i.zip</fileNamePattern>
      <minIndex>1</minIndex>
      <maxIndex>5</maxIndex>
    </rollingPolicy>
    <triggeringPolicy class="ch.qos.logback.core.rolling.SizeBasedTriggeringPolicy">
      <maxFileSize>50MB</maxFileSize>
    </triggeringPolicy>
    <encoder>
      <pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="FILE" />
  </root>
</configuration>
"""


def _yaml_str(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a YAML string, quoted and escaped


def _xml_text(value: object) -> str:
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- the node ------------------------------------------------------------------------------------


class CassandraNode:
    """One Cassandra process on loopback, its configuration, data and logs in ``directory``.

    ``port`` (CQL) and ``storage_port`` (gossip, unused by clients) are picked free on 127.0.0.1
    when 0, once: a restart keeps them. ``commitlog_sync="batch"`` fsyncs every write before
    acknowledging it, so a killed node keeps what it acknowledged (measured on a 2-core VM: about
    1 ms more per write); ``"periodic"`` is Cassandra's default, an fsync every 10 s. ``lib`` is a
    directory of jars (default: ``fetch()``). JMX is off (Cassandra logs a warning and goes on).
    """

    def __init__(
        self,
        *,
        directory: Path,
        port: int = 0,
        storage_port: int = 0,
        heap: str = "768m",
        commitlog_sync: CommitlogSync = "batch",
        cluster_name: str = "mqchat-dev",
        cache_dir: Path | None = None,
        lib: Path | None = None,
    ) -> None:
        self.directory = directory.absolute()
        self.heap = heap
        self.commitlog_sync = commitlog_sync
        self.cluster_name = cluster_name
        self._cache_dir = cache_dir
        self._lib = lib
        self._port = port
        self._storage_port = storage_port
        self._auto_ports = (port == 0, storage_port == 0)
        self._started = False  # once started, the ports are the node's for good
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self._log_start = 0  # where this run's lines begin in logs/system.log

    # -- where to find it

    @property
    def contact_point(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        """The CQL (native transport) port; 0 until the first start picks one."""
        return self._port

    @property
    def storage_port(self) -> int:
        return self._storage_port

    @property
    def store_url(self) -> str:
        """What ``mqchat serve --store`` takes to use this node (keyspace mqchat, one replica)."""
        return f"cassandra://{HOST}:{self._port}/mqchat?rf=1"

    @property
    def log_file(self) -> Path:
        return self.directory / "logs" / "system.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- life cycle

    def start(self, *, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the node and return once it serves CQL; DevNodeError (with the log's tail) if it
        exits or is not ready within timeout_s."""
        if self.running:
            raise DevNodeError(f"the Cassandra node in {self.directory} is already running")
        self._reap()
        lib = self._lib or fetch(self._cache_dir)
        java = find_java()
        self._prepare_directory()
        # Ports this node picked itself can be taken between the pick and the JVM's bind: pick again.
        attempts = 3 if all(self._auto_ports) and not self._started else 1
        for attempt in range(1, attempts + 1):
            if not self._started:
                self._pick_ports()
            try:
                self._check_ports_free()
                self._write_config()
                self._launch(java, lib)
                self._wait_ready(timeout_s)
            except _PortTaken as taken:
                if attempt == attempts:
                    raise DevNodeError(str(taken)) from None
                logger.info("a port the Cassandra node picked was taken meanwhile; starting again on others")
                self._port = self._storage_port = 0
                continue
            except BaseException:
                self.kill()
                raise
            self._started = True
            return

    def stop(self, *, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (Cassandra flushes and drains), SIGKILL if it has not exited within timeout_s."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("Cassandra (pid %d) did not stop within %.0f s: killing it", process.pid, timeout_s)
                process.kill()
                process.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: what a crash does. The next start replays the commit log: every acknowledged write
        with commitlog_sync="batch", all but up to the last 10 s with "periodic"."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._reap()

    def restart(self, *, timeout_s: float = START_TIMEOUT_S) -> None:
        """Stop (if running) and start again on the same ports and data."""
        self.stop()
        self.start(timeout_s=timeout_s)

    def wait_exited(self) -> int:
        """Wait until the process exits by itself (or is stopped from elsewhere); its exit status."""
        if self._process is None:
            raise DevNodeError("the Cassandra node is not running")
        return self._process.wait()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of this run's log and of the JVM's own output."""
        parts = []
        for path, offset in ((self.log_file, self._log_start), (self._output_file, 0)):
            with contextlib.suppress(OSError):
                with path.open("rb") as handle:
                    size = handle.seek(0, os.SEEK_END)
                    handle.seek(max(offset, size - 64 * 1024))
                    text = _tail(handle.read().decode(errors="replace"), lines)
                if text:
                    parts.append(f"--- {path}\n{text}")
        return "\n".join(parts) or f"(nothing logged in {self.directory / 'logs'})"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the parts of start

    @property
    def _output_file(self) -> Path:
        return self.directory / "logs" / "output.log"

    def _prepare_directory(self) -> None:
        private_dir(self.directory)
        for name in ("conf", "logs", "data", "commitlog", "saved_caches", "hints", "cdc_raw", "triggers"):
            (self.directory / name).mkdir(mode=0o700, exist_ok=True)

    def _pick_ports(self) -> None:
        taken: set[int] = set()
        if self._port == 0:
            self._port = _free_port(taken)
        taken.add(self._port)
        if self._storage_port == 0:
            self._storage_port = _free_port(taken)
        if self._port == self._storage_port:
            raise DevNodeError(f"the CQL port and the storage port are both {self._port}")

    def _check_ports_free(self) -> None:
        busy = [port for port in (self._port, self._storage_port) if not _bindable(port)]
        if busy:
            listed = " and ".join(map(str, busy))
            raise _PortTaken(f"port {listed} on {HOST} is in use (another Cassandra?): give the node other ports")

    def _write_config(self) -> None:
        conf = self.directory / "conf"
        d = self.directory
        (conf / "cassandra.yaml").write_text(
            _YAML.format(
                version=cassandra_version(),
                cluster_name=_yaml_str(self.cluster_name),
                host=HOST,
                port=self._port,
                storage_port=self._storage_port,
                data=_yaml_str(d / "data"),
                commitlog=_yaml_str(d / "commitlog"),
                saved_caches=_yaml_str(d / "saved_caches"),
                hints=_yaml_str(d / "hints"),
                cdc_raw=_yaml_str(d / "cdc_raw"),
                commitlog_sync=_COMMITLOG_SYNC[self.commitlog_sync],
            )
        )
        (conf / "logback.xml").write_text(_LOGBACK.format(log=_xml_text(self.log_file)))
        for written in conf.iterdir():
            written.chmod(0o600)

    def command(self, java: Java, lib: Path) -> list[str]:
        """The java command line of this node (after ``_write_config``)."""
        jamm = sorted(lib.glob("jamm-*.jar"))
        if not jamm:
            raise DevNodeError(f"no jamm jar in {lib}: the jars are incomplete (delete {lib.parent} and fetch again)")
        conf = self.directory / "conf"
        return [
            str(java.binary),
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            *JVM_OPTIONS,
            f"-javaagent:{jamm[-1]}",
            f"-Dcassandra.config={(conf / 'cassandra.yaml').as_uri()}",
            f"-Dcassandra.storagedir={self.directory}",
            f"-Dcassandra.triggers_dir={self.directory / 'triggers'}",
            f"-Dcassandra.logdir={self.directory / 'logs'}",
            f"-Dlogback.configurationFile={(conf / 'logback.xml').as_uri()}",
            "-cp",
            str(lib / "*"),
            "org.apache.cassandra.service.CassandraDaemon",
        ]

    def _launch(self, java: Java, lib: Path) -> None:
        command = self.command(java, lib)
        try:
            self._log_start = self.log_file.stat().st_size
        except FileNotFoundError:
            self._log_start = 0
        self._output = self._output_file.open("ab")
        logger.info(
            "starting Cassandra %s in %s (CQL on %s:%d, heap %s)",
            cassandra_version(),
            self.directory,
            HOST,
            self._port,
            self.heap,
        )
        die_with_parent = threading.current_thread() is threading.main_thread()
        self._process = subprocess.Popen(
            command,
            cwd=self.directory,
            env={**os.environ, "JAVA_HOME": str(java.home), "MALLOC_ARENA_MAX": "4"},
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            # Not in our process group: Ctrl-C reaches this process, which then stops the node.
            start_new_session=True,
            preexec_fn=_child_setup if die_with_parent else _private_umask,
        )

    def _wait_ready(self, timeout_s: float) -> None:
        process = self._process
        assert process is not None
        started = time.monotonic()
        deadline = started + timeout_s
        next_progress = started + _PROGRESS_EVERY_S
        scanner = _LogScanner(self.log_file, self._log_start)
        while True:
            status = process.poll()
            if status is not None:
                tail = self.log_tail()
                self._reap()
                message = f"Cassandra exited with status {status} while starting:\n{tail}"
                raise _PortTaken(message) if "Address already in use" in tail else DevNodeError(message)
            if scanner.found(READY_MARKERS) and _connects(self._port):
                logger.info("Cassandra is ready on %s:%d after %.1f s", HOST, self._port, time.monotonic() - started)
                return
            now = time.monotonic()
            if now >= deadline:
                tail = self.log_tail()
                self.kill()
                raise DevNodeError(f"Cassandra did not serve CQL within {timeout_s:.0f} s:\n{tail}")
            if now >= next_progress:
                next_progress += _PROGRESS_EVERY_S
                logger.info("Cassandra still starting after %.0f s: %s", now - started, scanner.last_line())
            time.sleep(0.2)

    def _reap(self) -> None:
        self._process = None
        if self._output is not None:
            self._output.close()
            self._output = None


class _PortTaken(DevNodeError):
    """A picked port was bound by someone else before Cassandra bound it."""


class _LogScanner:
    """Reads a growing log from an offset and finds markers (also ones split across reads)."""

    def __init__(self, path: Path, offset: int) -> None:
        self._path = path
        self._offset = offset
        self._recent = b""
        self._seen: set[bytes] = set()

    def found(self, markers: Sequence[bytes]) -> bool:
        """Whether every marker has been logged since the offset."""
        try:
            with self._path.open("rb") as handle:
                if handle.seek(0, os.SEEK_END) < self._offset:
                    self._offset = 0  # rolled over
                handle.seek(self._offset)
                fresh = handle.read()
        except FileNotFoundError:
            fresh = b""
        self._offset += len(fresh)
        window = self._recent + fresh
        self._recent = window[-4096:]
        self._seen.update(marker for marker in markers if marker in window)
        return self._seen.issuperset(markers)

    def last_line(self) -> str:
        lines = self._recent.decode(errors="replace").strip().splitlines()
        return lines[-1][:200] if lines else "(nothing logged yet)"


def _free_port(taken: set[int]) -> int:
    for _ in range(100):
        if (port := free_port()) not in taken:
            return port
    raise DevNodeError(f"no free port other than {sorted(taken)} (is MQCHAT_PORT_RANGE a single port?)")


def _bindable(port: int) -> bool:
    """Whether a listener could bind port now (SO_REUSEADDR, as the JVM's: a restart is not held
    up by the connections of the process before it, only by a listener)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _connects(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., object] | None:
    try:
        prctl: Callable[..., object] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    return prctl


_prctl = _load_prctl()  # resolved here, in the parent: the child must not load libraries


def _private_umask() -> None:
    os.umask(0o077)


def _child_setup() -> None:
    """In the child, before exec: files only the owner reads, and SIGTERM when this process dies
    (Linux), so that no JVM outlives a killed test run. Only when started from the main thread:
    the signal follows the thread that started the child, not the process."""
    os.umask(0o077)
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# --- the command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m storage.cassandra.devnode",
        description=f"A single-node Cassandra {cassandra_version()} for development and tests.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the jars go ($MQCHAT_CASSANDRA_HOME, ~/.cache/mqchat/cassandra)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", parents=[common], help="download Cassandra's jars with Maven (once)")
    run = commands.add_parser(
        "run", parents=[common], help="fetch, start a node and keep it in the foreground until Ctrl-C"
    )
    run.add_argument("--dir", type=Path, default=Path("data/cassandra"), help="data, logs and config (%(default)s)")
    run.add_argument("--port", type=int, default=9042, help="CQL port (%(default)s; 0: a free one)")
    run.add_argument("--storage-port", type=int, default=7000, help="inter-node port (%(default)s; 0: a free one)")
    run.add_argument("--heap", default="768m", help="JVM heap, -Xms and -Xmx (%(default)s)")
    run.add_argument(
        "--commitlog-sync",
        choices=["batch", "group", "periodic"],
        default="batch",
        help="batch: fsync each write before acknowledging it; group: acknowledge after the next 5 ms "
        "group fsync; periodic: fsync every 10 s (%(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "fetch":
            lib = fetch(args.cache_dir)
            print(f"Cassandra {cassandra_version()} jars: {lib}")
            return 0
        node = CassandraNode(
            directory=args.dir,
            port=args.port,
            storage_port=args.storage_port,
            heap=args.heap,
            commitlog_sync=args.commitlog_sync,
            cache_dir=args.cache_dir,
        )
        return _run(node)
    except DevNodeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _run(node: CassandraNode) -> int:
    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        with node:
            print(f"\nCassandra {cassandra_version()} is serving CQL on {node.contact_point}:{node.port}")
            print(f"  data, config and logs: {node.directory} (log: {node.log_file})")
            print(f"  mqchat serve --store '{node.store_url}'")
            print("Ctrl-C stops it.", flush=True)
            status = node.wait_exited()
            print(f"Cassandra exited by itself (status {status}):\n{node.log_tail()}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("Cassandra stopped.")
        return 0


if __name__ == "__main__":
    sys.exit(main())
