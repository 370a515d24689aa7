"""The console process: make sure the token exists, then serve the app with uvicorn until SIGTERM."""

from __future__ import annotations

import os
import secrets
import socket

from .. import config as config_mod
from ..control.signals import CONSOLE_NAME, set_process_name


def ensure_token(path: str) -> str:
    """The login token from path; on first start a random one is created there, readable by its owner only."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    with open(path) as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"{path} holds no token; expected one line (delete the file to get a new one)")
    return token


HEADER_BYTES_MAX = 16384   # request line and headers
KEEP_ALIVE_SECONDS = 5


def main(settings_json: str, config_path: str, run_dir: str, log) -> int:
    import uvicorn

    from .app import ConsoleState, make_app
    set_process_name(CONSOLE_NAME)  # `ps -o comm`: found with `grep ipfix` like the handlers
    settings = config_mod.Console.from_json(settings_json)
    try:
        token = ensure_token(settings.token_file)
    except (OSError, ValueError) as exc:
        log.error("console_not_started", token_file=settings.token_file, reason=str(exc))
        return 1
    # Bound here, not by uvicorn: a port in use is then one plain log line (and the supervisor's backoff).
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        log.error("console_not_started", reason=f"cannot listen on {settings.host}/{settings.port}: {exc.strerror}")
        return 1
    app = make_app(ConsoleState(settings, config_path, run_dir, token, log))
    log.info("console_started", host=settings.host, port=settings.port, tls=bool(settings.tls_cert),
             token_file=settings.token_file)
    server = uvicorn.Server(uvicorn.Config(
        app, ssl_certfile=settings.tls_cert or None, ssl_keyfile=settings.tls_key or None, log_config=None,
        access_log=False, server_header=False, proxy_headers=False, timeout_graceful_shutdown=2,
        # Headers are capped and an idle keep-alive connection is closed (a browser reconnects without
        # noticing). No concurrency cap: uvicorn never closes a connection that sends no request, so a cap
        # would let a few idle sockets shut the operator out; the console is a process of its own, and its
        # descriptors are not the handlers' or the supervisor's.
        h11_max_incomplete_event_size=HEADER_BYTES_MAX, timeout_keep_alive=KEEP_ALIVE_SECONDS))
    server.run(sockets=[sock])
    return 0
