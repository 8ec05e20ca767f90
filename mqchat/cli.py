"""The ``mqchat`` command: serve, token, a chat client (chat / send / listen / download) and bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from mqchat import __version__
from mqchat.config import Config, SecretMode, load_config, parse_duration, with_jwt_secret
from mqchat.errors import ConfigError

logger = logging.getLogger("mqchat")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``mqchat: <what is wrong> (see mqchat CMD --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mqchat: {message} (see {self.prog} --help)\n")


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (env MQCHAT_CONFIG)")
    p.add_argument("--data-dir", help="where the database and generated secret live (default ./data)")
    p.add_argument("--jwt-secret", help="HS256 secret for access tokens (env MQCHAT_JWT_SECRET)")


def _token_flags(p: argparse.ArgumentParser) -> None:
    """How the servers verify access tokens beyond the HS256 secret (env MQCHAT_JWT_PUBLIC_KEY, …)."""
    p.add_argument("--jwt-public-key", help="PEM public key (EC P-256 or RSA) that verifies ES256/RS256 tokens")
    p.add_argument("--jwks-url", help="the identity provider's JWKS URL, for ES256/RS256 tokens naming a kid")
    p.add_argument(
        "--jwt-algorithms",
        help="accepted token algorithms, e.g. HS256,ES256 (default HS256, plus ES256 and RS256 with a key or JWKS)",
    )
    p.add_argument("--jwt-issuer", help="when set, a token's iss must equal it")
    p.add_argument("--jwt-audience", help="when set, a token's aud must contain it")
    p.add_argument("--jwt-leeway", help="clock skew tolerated on exp, nbf and iat (default 30s)")
    p.add_argument("--token-grace", help="how long a connection may outlast its token's exp (default 30s)")


def _client_flags(p: argparse.ArgumentParser) -> None:
    _server_flags(p)
    p.add_argument("--host", help="server host (default 127.0.0.1)")
    p.add_argument("--mqtt-port", help="the server's MQTT port (default 1883)")
    p.add_argument("--user", required=True)
    p.add_argument("--device", required=True)
    p.add_argument(
        "--token",
        help="access token (env MQCHAT_TOKEN); by default one is signed with the local secret",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mqchat", description="Self-hostable messaging backend for mobile chat.")
    parser.add_argument("--version", action="version", version=f"mqchat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the broker, the bridge and the HTTP API")
    _server_flags(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for phones on the LAN)")
    serve.add_argument("--mqtt-port", help="MQTT port (default 1883)")
    serve.add_argument("--http-port", help="HTTP port (default 8080)")
    serve.add_argument("--node-id", help="this node's name in a cluster (default: host name and MQTT port)")
    serve.add_argument("--mqtt-backlog", help="the MQTT listener's accept queue (default 4096)")
    serve.add_argument("--mqtt-max-connections", help="MQTT connections at once, 0: no limit (default 0)")
    serve.add_argument(
        "--mqtt-connect-rate", help="new MQTT connections per second from one IP, 0: no limit (default 0)"
    )
    serve.add_argument(
        "--tls-cert", help="PEM certificate (chain) for MQTT over TLS, WSS and HTTPS; reloaded on change"
    )
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", help="CA bundle: clients must present a certificate it signed (mutual TLS)")
    serve.add_argument("--mqtts-port", help="MQTT over TLS port, with --tls-cert (default 8883; off: none)")
    serve.add_argument("--https-port", help="HTTPS port, with --tls-cert (default 8443; off: none)")
    serve.add_argument("--ws-port", help="MQTT over WebSocket port (default off)")
    serve.add_argument("--wss-port", help="MQTT over WebSocket with TLS port, with --tls-cert (default off)")
    serve.add_argument("--ws-path", help="the WebSocket path MQTT is served on (default /mqtt)")
    serve.add_argument("--plaintext", help="false: open only the TLS listeners (default true)")
    serve.add_argument("--max-envelope-bytes", help="largest request envelope (default 64KiB)")
    serve.add_argument(
        "--adapter", choices=("mqtt", "inbroker"), help="how requests reach the bridge pipeline (default inbroker)"
    )
    serve.add_argument("--storage-backend", help="where messages and push state live: sqlite (default), cassandra")
    serve.add_argument(
        "--store",
        help="the storage backend as a URL: sqlite:DIR, sqlite:///ABS/DIR, "
        "cassandra://HOST[,HOST…][:PORT]/KEYSPACE[?dc=…&rf=…&consistency=…] (env MQCHAT_STORE)",
    )
    serve.add_argument("--log-level", help="DEBUG, INFO (default), WARNING, ERROR")
    serve.add_argument(
        "--redis-url",
        help="share presence through Redis (redis://host:6379/0) across processes; default: in memory",
    )
    serve.add_argument("--presence-grace", help="reconnects within this never show offline (default 5s)")
    serve.add_argument("--apns-key-file", help="APNs token-auth key (.p8) for iOS push")
    serve.add_argument("--apns-key-id", help="the key's 10-character id")
    serve.add_argument("--apns-team-id", help="your Apple developer team id")
    serve.add_argument("--apns-topic", help="the iOS app's bundle id")
    serve.add_argument("--apns-sandbox", help="true for development builds (Apple's sandbox)")
    serve.add_argument("--fcm-credentials", help="Firebase service-account JSON file for Android push")
    _token_flags(serve)

    bridge = sub.add_parser(
        "bridge", help="run bridge workers (pipeline and HTTP API) for an external MQTT broker, e.g. Mosquitto or EMQX"
    )
    _server_flags(bridge)
    bridge.add_argument("--broker", help="the external broker, HOST:PORT (env MQCHAT_BROKER)")
    bridge.add_argument("--workers", help="worker processes sharing the broker's requests (default 1)")
    bridge.add_argument("--host", help="address the HTTP API listens on (default 127.0.0.1)")
    bridge.add_argument("--http-port", help="HTTP port, shared by the workers (default 8080)")
    bridge.add_argument("--node-id", help="this machine's name, in the workers' client ids (default: host name:1883)")
    bridge.add_argument("--store", help="the shared store, cassandra://HOST[,HOST…][:PORT]/KEYSPACE (env MQCHAT_STORE)")
    bridge.add_argument("--redis-url", help="the presence registry shared with the rest of the deployment")
    bridge.add_argument("--log-level", help="DEBUG, INFO (default), WARNING, ERROR")
    _token_flags(bridge)
    token = sub.add_parser("token", help="print an access token (JWT) for local use")
    _server_flags(token)
    token.add_argument("--user", required=True)
    token.add_argument("--device", required=True)
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m, 1h, 7d (default 1h)")
    token.add_argument(
        "--private-key", metavar="PEM", help="sign with this private key (EC P-256: ES256, RSA: RS256), not the secret"
    )
    token.add_argument("--kid", help="the key id to name in the token's header")
    token.add_argument("--alg", choices=("ES256", "RS256"), help="the algorithm (default: the private key's)")
    token.add_argument("--iss", help="the token's issuer (iss)")
    token.add_argument("--aud", help="the token's audience (aud)")

    admin = sub.add_parser(
        "admin-credential", help="print the credential of the admin API (derived from the server's secret)"
    )
    _server_flags(admin)

    chat = sub.add_parser("chat", help="interactive 1:1 chat")
    _client_flags(chat)
    chat.add_argument("--to", required=True, help="the other user")

    send = sub.add_parser("send", help="send one message (or a file) and print its ack")
    _client_flags(send)
    target = send.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", help="the other user (1:1)")
    target.add_argument("--conv", help="a conversation id")
    send.add_argument("--body", help="the text (with --file: its caption)")
    send.add_argument(
        "--file", metavar="PATH", help="upload this file (resuming after cuts) and send it as a media message"
    )
    send.add_argument("--http-port", help="the server's HTTP port, for --file (default 8080)")
    send.add_argument(
        "--state",
        help="with --file: a file remembering unfinished uploads (and unacked sends), "
        "so that running the command again resumes the upload",
    )
    send.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the ack (with --file: after the upload)"
    )

    listen = sub.add_parser(
        "listen", help="print incoming events as JSON lines, first catching up on what arrived meanwhile"
    )
    _client_flags(listen)
    listen.add_argument("--http-port", help="the server's HTTP port, for catching up (default 8080)")
    listen.add_argument("--live", action="store_true", help="only what arrives from now on (no catch-up over HTTP)")
    listen.add_argument(
        "--state",
        help="a file remembering what this device has shown, so the next run starts after it "
        "(default: none; every run catches up from the start of each conversation's history)",
    )
    listen.add_argument("--count", type=int, help="stop after this many events")
    listen.add_argument("--timeout", type=float, help="stop after this many seconds")

    download = sub.add_parser(
        "download", help="download a file (resuming a cut one) and print {id, path, size} as JSON"
    )
    _client_flags(download)
    download.add_argument("--http-port", help="the server's HTTP port (default 8080)")
    download.add_argument("--id", required=True, help="the media id (an attachment's id)")
    download.add_argument(
        "--out", required=True, metavar="PATH", help="where to write it (PATH.part until it is complete)"
    )

    deploy = sub.add_parser("deploy", help="configuration for what runs around mqchat: HAProxy, Mosquitto, EMQX")
    targets = deploy.add_subparsers(dest="target", required=True, metavar="TARGET", parser_class=_Parser)
    haproxy = targets.add_parser("haproxy", help="an HAProxy load balancer for MQTT and HTTP (TCP mode)")
    haproxy.add_argument(
        "--node",
        action="append",
        required=True,
        metavar="NAME=HOST:MQTT_PORT:HTTP_PORT",
        help="a node (repeat for each); NAME is its --node-id",
    )
    haproxy.add_argument("--mqtt-bind", default=":1883", help="where devices connect (default :1883)")
    haproxy.add_argument("--http-bind", default=":8080", help="where HTTP clients connect (default :8080)")
    haproxy.add_argument("--check-interval", default="1s", help="health check interval (default 1s)")
    emqx = targets.add_parser("emqx", help="print EMQX 5 settings that make EMQX ask mqchat (HTTP hooks)")
    _server_flags(emqx)
    emqx.add_argument("--url", required=True, help="where EMQX reaches mqchat's HTTP API, e.g. http://mqchat:8080")
    mosquitto = targets.add_parser(
        "mosquitto", help="write a Mosquitto 2 configuration (pattern ACLs, passwords) for `mqchat bridge`"
    )
    _server_flags(mosquitto)
    mosquitto.add_argument("--dir", required=True, help="where to write mosquitto.conf, acl and passwd")
    mosquitto.add_argument("--port", default="1883", help="Mosquitto's port (default 1883)")
    mosquitto.add_argument("--bind", default="127.0.0.1", help="Mosquitto's address (default 127.0.0.1)")
    mosquitto.add_argument(
        "--run-as", default="mosquitto", help="the account Mosquitto runs as; it owns the files (default mosquitto)"
    )
    mosquitto.add_argument(
        "--users",
        metavar="FILE",
        help="device users and their passwords, one NAME=PASSWORD a line ('-': standard input); "
        "the bridge's own account comes from the JWT secret",
    )

    bench = sub.add_parser(
        "bench", help="benchmark against stock amqtt and Mosquitto (see `mqchat bench --help`)", add_help=False
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


CHILDREN = ("broker", "bridge", "node")


def _is_child(name: str) -> bool:
    from mqchat.config import MAX_WORKERS
    from mqchat.supervisor import WORKER_PREFIX

    number = name.removeprefix(WORKER_PREFIX)
    worker = name.startswith(WORKER_PREFIX) and number.isdigit() and number == str(int(number))
    return name in CHILDREN or (worker and int(number) < MAX_WORKERS)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if v is not None}


def _given_token(args: argparse.Namespace) -> str | None:
    return getattr(args, "token", None) or os.environ.get("MQCHAT_TOKEN") or None


def _client_token(args: argparse.Namespace, config: Config) -> str:
    from mqchat.tokens import issue_token

    given = _given_token(args)
    if given:
        return str(given)
    return issue_token(secret=config.auth.jwt_secret, user=args.user, device=args.device, ttl_s=3600)


def _http_url(config: Config) -> str:
    from mqchat.app import local_host

    return f"http://{local_host(config.network.host)}:{config.network.http_port}"


def _run_client(args: argparse.Namespace, config: Config) -> int:
    from clients import cli as client_cli
    from mqchat.ids import dm_conv

    # The SDK's warnings (a lost connection, a reconnect) as plain lines; a failure is printed
    # once, by the command itself.
    logging.basicConfig(level=logging.WARNING, format="mqchat: %(message)s", stream=sys.stderr)

    token = _client_token(args, config)
    common = {
        "host": config.network.host,
        "port": config.network.mqtt_port,
        "user": args.user,
        "device": args.device,
        "token": token,
    }
    if args.command == "chat":
        return asyncio.run(client_cli.chat(**common, peer=args.to))
    if args.command == "download":
        http_url = _http_url(config)
        return asyncio.run(client_cli.download(http_url=http_url, token=token, media_id=args.id, out=Path(args.out)))
    state = Path(args.state) if args.state else None
    if args.command == "send":
        conv = args.conv or dm_conv(args.user, args.to)
        if args.file is None:
            return asyncio.run(client_cli.send(**common, conv=conv, body=args.body, timeout=args.timeout))
        return asyncio.run(
            client_cli.send(
                **common,
                conv=conv,
                body=args.body or "",
                timeout=args.timeout,
                file=Path(args.file),
                http_url=_http_url(config),
                state_path=state,
            )
        )
    return asyncio.run(
        client_cli.listen(
            **common,
            count=args.count,
            timeout=args.timeout,
            http_url=None if args.live else _http_url(config),
            state_path=state,
        )
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own flags; no config: it starts its own servers with their own secrets
        from mqchat.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["_child"] and len(argv) == 2 and _is_child(argv[1]):
        # How the supervisor starts its processes (settings in MQCHAT_* variables); not a command.
        # The supervisor forwards SIGHUP (reload the TLS certificate): never a stop, even early.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return _child(argv[1])
    args = build_parser().parse_args(argv)
    if args.command == "send" and args.body is None and args.file is None:
        print("mqchat: send needs --body, --file or both (see mqchat send --help)", file=sys.stderr)
        return 2
    if args.command == "deploy":
        return _deploy(args)
    if args.command == "admin-credential":
        return _admin_credential(args)
    # Only the server creates the secret; client commands find the server's (or need none: a token).
    mode: SecretMode = "find"  # `bridge` too: its workers must share the deployment's secret
    if args.command == "serve":
        mode = "defer"
    elif args.command not in ("token", "bridge") and _given_token(args):
        mode = "skip"
    elif args.command == "token" and args.private_key:
        mode = "defer"  # signed with the private key: no secret needed
    try:
        config, _ = load_config(_flags(args), secret=mode)
    except ConfigError as exc:
        print(f"mqchat: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command in ("serve", "bridge"):
            return _serve(config, args.command)
        if args.command == "token":
            return _token(args, config)
        return _run_client(args, config)
    except KeyboardInterrupt:
        return 130


def _deploy(args: argparse.Namespace) -> int:
    from mqchat.deploy import haproxy_config, parse_node_address

    if args.target == "mosquitto":
        return _deploy_mosquitto(args)
    if args.target == "emqx":
        return _deploy_emqx(args)
    try:
        nodes = [parse_node_address(n) for n in args.node]
        interval_ms = round(parse_duration(args.check_interval) * 1000)
        if interval_ms < 1:
            raise ValueError("--check-interval must be at least 1ms")
        print(haproxy_config(nodes, mqtt_bind=args.mqtt_bind, http_bind=args.http_bind, check_interval_ms=interval_ms))
    except (ConfigError, ValueError) as exc:
        print(f"mqchat: {exc}", file=sys.stderr)
        return 2
    return 0


def _deploy_mosquitto(args: argparse.Namespace) -> int:
    from mqchat.config import parse_port
    from mqchat.deploy import mosquitto_files
    from mqchat.tokens import SERVICE_USERNAME, service_password

    try:
        secret = _server_secret(args)
        users = _read_users(args.users)
        directory = Path(args.dir).resolve()
        files = mosquitto_files(
            str(directory),
            service_user=SERVICE_USERNAME,
            service_password=service_password(secret),
            users=users,
            port=parse_port(args.port),
            bind=args.bind,
            run_as=args.run_as,
        )
        (directory / "data").mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, text in files.items():
            path = directory / name
            path.touch(mode=0o600)
            path.chmod(0o600)
            path.write_text(text)
        _give_to(args.run_as, [directory / "data", *(directory / name for name in files)])
    except (ConfigError, ValueError, OSError) as exc:
        print(f"mqchat: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(files)} in {directory}; run: mosquitto -c {directory / 'mosquitto.conf'}")
    return 0


def _server_secret(args: argparse.Namespace) -> str:
    """The JWT secret the server uses (flags, environment, config file or the data dir's)."""
    wanted = {k: v for k, v in _flags(args).items() if k in ("config", "data_dir", "jwt_secret")}
    config, _ = load_config(wanted, secret="find")
    return config.auth.jwt_secret


def _admin_credential(args: argparse.Namespace) -> int:
    from mqchat.tokens import admin_credential

    try:
        print(admin_credential(_server_secret(args)))
    except ConfigError as exc:
        print(f"mqchat: {exc}", file=sys.stderr)
        return 2
    return 0


def _deploy_emqx(args: argparse.Namespace) -> int:
    from mqchat.deploy import emqx_config
    from mqchat.tokens import hooks_credential

    try:
        print(emqx_config(args.url, hooks_credential(_server_secret(args))), end="")
    except (ConfigError, ValueError) as exc:
        print(f"mqchat: {exc}", file=sys.stderr)
        return 2
    return 0


def _read_users(source: str | None) -> dict[str, str]:
    """NAME=PASSWORD lines (blank lines and # comments skipped) from a file or standard input."""
    if source is None:
        return {}
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, password = line.strip().partition("=")
        if not sep or not password:
            raise ValueError(f"{source}, line {number}: not NAME=PASSWORD")
        if name in users:
            raise ValueError(f"{source}, line {number}: {name} appears twice")
        users[name] = password
    return users


def _give_to(account: str, paths: list[Path]) -> None:
    """Run as root: make account (if it exists) the owner of paths, which only it may read."""
    import pwd
    import shutil

    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(account)
    except KeyError:
        return
    for path in paths:
        shutil.chown(path, entry.pw_uid, entry.pw_gid)


def _child(which: str) -> int:
    from mqchat.child import run_child

    try:
        config, _ = load_config({})
    except ConfigError as exc:
        print(f"mqchat: {exc}", file=sys.stderr)
        return 2
    return run_child(which, config)


def _token(args: argparse.Namespace, config: Config) -> int:
    from mqchat.tokens import issue_token, load_private_key

    try:
        ttl = parse_duration(args.ttl)
        if args.alg and not args.private_key:
            raise ValueError("--alg needs --private-key (without one, tokens are HS256 with the secret)")
        private_key = None
        if args.private_key:
            try:
                private_key = Path(args.private_key).read_bytes()
                load_private_key(private_key)
            except OSError as exc:
                raise ValueError(f"cannot read --private-key {args.private_key}: {exc.strerror}") from None
            except ValueError as exc:
                raise ValueError(f"--private-key {args.private_key}: {exc}") from None
        token = issue_token(
            secret=config.auth.jwt_secret,
            user=args.user,
            device=args.device,
            ttl_s=int(ttl),
            private_key=private_key,
            algorithm=args.alg,
            kid=args.kid,
            issuer=args.iss,
            audience=args.aud,
        )
        print(token)
    except (ConfigError, ValueError) as exc:
        print(f"mqchat: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_mode(config: Config, *, bridge: bool) -> None:
    """`serve` runs a broker of its own, `bridge` serves another one: the settings must agree."""
    settings = config.bridge
    if bridge and not settings.broker:
        raise ConfigError("mqchat bridge needs the broker it serves: --broker HOST:PORT (or MQCHAT_BROKER)")
    if not bridge and (settings.broker or settings.workers > 1):
        raise ConfigError("broker and workers are settings of `mqchat bridge`, not of `mqchat serve`")
    if settings.workers > 1 and config.storage.backend == "sqlite":
        raise ConfigError(
            "several bridge workers need a store they share (--store cassandra://…): SQLite is one process's"
        )
    if settings.workers > 1 and config.network.http_port == 0:
        raise ConfigError("several bridge workers share one HTTP port: give --http-port a number, not 0")


def _announce_web_chat(config: Config) -> None:
    """Say where the web chat is served, and what it lacks: its MQTT-over-WebSocket listener,
    or the dev sign-in (open only in dev mode; see mqchat.app.dev_sign_in_open)."""
    from mqchat.app import built_web_app, dev_sign_in_open, local_host

    net = config.network
    if config.bridge.broker or not net.plaintext or built_web_app() is None:
        return
    url = f"http://{local_host(net.host)}:{net.http_port}/app"
    if net.ws_port is None:
        logger.info("web chat on %s needs MQTT over WebSocket: start with --ws-port 8081", url)
    elif dev_sign_in_open(config):
        logger.info(
            "web chat on %s (dev sign-in open on this machine only: the secret is the one generated in the data dir)",
            url,
        )
    elif config.auth.dev_secret:
        logger.info(
            "web chat on %s (sign in with an access token, e.g. from mqchat token: the dev sign-in opens only "
            "on a loopback host such as 127.0.0.1, without TLS)",
            url,
        )
    else:
        logger.info("web chat on %s (sign in with an access token: the dev sign-in is closed)", url)


def _serve(config: Config, command: str = "serve") -> int:
    from mqchat.app import local_host
    from mqchat.child import ensure_data_dir, ensure_ports_free, setup_logging
    from mqchat.supervisor import Supervisor

    setup_logging(config.log_level, "serve")
    try:
        _check_mode(config, bridge=command == "bridge")
        ensure_ports_free(config)
        ensure_data_dir(config)
        config, generated = with_jwt_secret(config)
    except ConfigError as exc:
        print(f"mqchat: {exc}", file=sys.stderr)
        return 1
    if generated:
        print(
            f"mqchat: generated a new JWT secret in {config.storage.data_dir / 'jwt_secret'} "
            "(keep it private; set MQCHAT_JWT_SECRET to use your own)",
            file=sys.stderr,
        )
    net = config.network
    if config.bridge.broker:
        logger.info(
            "version %s: %d bridge worker(s) for the broker at %s, HTTP on http://%s:%d, store %s",
            __version__,
            config.bridge.workers,
            config.bridge.broker,
            local_host(net.host),
            net.http_port,
            config.storage.url,
        )
        return asyncio.run(Supervisor(config=config).run())
    logger.info(
        "version %s: MQTT on %s:%d, HTTP on http://%s:%d, data in %s, store %s",
        __version__,
        net.host,
        net.mqtt_port,
        local_host(net.host),
        net.http_port,
        config.storage.data_dir.resolve(),
        config.storage.url,
    )
    _announce_web_chat(config)
    return asyncio.run(Supervisor(config=config).run())
