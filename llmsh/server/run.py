"""Serve the app with uvicorn on a socket bound here, and stop cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import threading

from ..errors import InputError

GRACEFUL_SHUTDOWN_S = 5   # connections get this long to close after a signal before they are cut


def is_loopback(host: str) -> bool:
    """True for a host name or address that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Raises InputError with one line (the address in use, a host that does not resolve).
    """
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(app, host: str = "127.0.0.1", port: int = 8088, *, sock: socket.socket | None = None, notice=None,
          log_level: str = "warning", access_log: bool = False) -> None:
    """Run ``app`` until SIGINT or SIGTERM, then stop: no new connections; the running and the
    queued requests are cancelled (a 503 "shutting down" error; a stream: an error event and
    ``[DONE]``; generation stops at the next token); connections get :data:`GRACEFUL_SHUTDOWN_S`
    seconds to close; the model thread stops. Returns normally (no re-raised signal, no traceback). ``notice`` is called with the one-line "serving" message.

    sock: a socket from :func:`bind` (bound before the model loads, so that a busy port fails
    at once); default: bind ``host:port`` now. Raises InputError when the address cannot be bound.
    """
    import uvicorn

    if sock is None:
        sock = bind(host, port)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    api = getattr(getattr(app, "state", None), "api", None)
    server = _Server(config, on_exit=api.worker.cancel_all if api is not None else None)
    if notice is not None:
        notice(f"serving on http://{shown}:{actual} (Ctrl-C to stop)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _Server(config, on_exit=None):
    """uvicorn's Server, except that a signal that stopped it is not raised again afterwards
    (uvicorn re-raises it so that the default action runs: SIGTERM would then kill the process
    with status 143 after a clean shutdown, SIGINT would surface as KeyboardInterrupt), and
    ``on_exit`` runs at the signal: the model's jobs are cancelled then, so that streams end
    with an error event at once instead of holding the shutdown for the graceful timeout."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if on_exit is not None:
                on_exit()

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in original.items():
                    signal.signal(s, h)

    return Server(config)
