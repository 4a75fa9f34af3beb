"""Running the API app under uvicorn: connection limits and timeouts, the API-key warning, the
stop on SIGINT / SIGTERM (drain, then cut what is left) and the exit code. `moejax serve` wires
its flags to `ServeOptions` and calls `serve`. docs/SERVING.md ("Limits", "Stopping") says what
each limit is.

Stopping: the first SIGINT or SIGTERM stops accepting connections and lets open requests finish
for up to `drain_timeout` seconds; a second signal ends the drain at once. Requests still open then
are ended, not dropped silently: a stream gets an error event and `data: [DONE]`, a JSON request a
503 in OpenAI's envelope. `serve` returns EXIT_OK when every accepted request finished, and
EXIT_DROPPED when the stop cut any short."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import math
import os
import resource
import signal
import sys
import threading
from typing import Callable

from moejax.errors import UserError

# the limits' defaults live here, in a module without JAX, so that the command can show them in --help
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string
ECHO_CHARS = 100  # the most of a client's value an error message repeats
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_BODY_TIMEOUT = 30.0
EXIT_OK = 0
EXIT_DROPPED = 3  # the stop ended some requests before they finished (2 is a bad flag, 1 a crash)
DEFAULT_LIMIT_CONCURRENCY = 1024
DEFAULT_KEEP_ALIVE = 5.0
DEFAULT_HEADER_TIMEOUT = 10.0
FD_RESERVE = 64  # file descriptors kept for everything but client connections
CUT_GRACE_S = 3.0  # after cutting open requests: time for their last bytes to go out
API_KEY_ENV = "MOEJAX_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    drain_timeout: float = 30.0  # seconds open requests may take to finish after the first signal
    limit_concurrency: int | None = None  # connections + requests before uvicorn answers 503 (None: default)
    timeout_keep_alive: float = DEFAULT_KEEP_ALIVE  # an idle kept-alive connection is closed after it
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # seconds to send a request's line and headers

    def validate(self) -> ServeOptions:
        """Checked options (UserError naming the flag), limit_concurrency resolved."""
        for name in ("drain_timeout", "timeout_keep_alive", "header_timeout"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= (0 if name == "drain_timeout" else 0.1)):
                raise UserError(f"--{name.replace('_', '-')} {v} must be >= "
                                f"{0 if name == 'drain_timeout' else 0.1} seconds")
        return dataclasses.replace(self, limit_concurrency=resolve_limit_concurrency(self.limit_concurrency))


def resolve_api_key(flag: str | None) -> str | None:
    """--api-key, else $MOEJAX_API_KEY, else None (no key: an open server)."""
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise UserError(f"the API key ({'--api-key' if flag is not None else API_KEY_ENV}) is empty")
    return key.strip() if key is not None else None


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The startup warning for a server other machines can reach without a key (None: no warning)."""
    if api_key or is_loopback(host):
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this port can use the "
            f"server; set --api-key or ${API_KEY_ENV} (or listen on 127.0.0.1)")


def resolve_limit_concurrency(requested: int | None) -> int:
    """--limit-concurrency checked against the file-descriptor limit (raising the soft limit
    towards the hard one when that is needed). Default: DEFAULT_LIMIT_CONCURRENCY, or what the
    descriptor limit leaves after FD_RESERVE."""
    if requested is not None and requested < 1:
        raise UserError(f"--limit-concurrency {requested} must be >= 1")
    want = (requested or DEFAULT_LIMIT_CONCURRENCY) + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    room = math.inf if soft == resource.RLIM_INFINITY else soft - FD_RESERVE
    if requested is None:
        return int(max(1, min(DEFAULT_LIMIT_CONCURRENCY, room)))
    if requested > room:
        raise UserError(f"--limit-concurrency {requested} needs {requested + FD_RESERVE} file descriptors; this "
                        f"process may open {soft} (ulimit -n)")
    return requested


def protocol_class(header_timeout: float):
    """uvicorn's h11 protocol with a request-head deadline: a connection must send each request's
    line and headers within `header_timeout` seconds of connecting or of its previous response
    (which also bounds how long the unread rest of a refused body is read and discarded), else it
    is closed. uvicorn 0.54 has keep-alive and concurrency limits but no such timeout, so a client
    that connects and sends nothing (or a header a byte at a time) would hold its connection for
    ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self._head_timer = None
            self._head_cycle = None

        def _arm_head(self):
            self._cancel_head()
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(header_timeout, self._head_expired)

        def _cancel_head(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self):
            self._head_timer = None
            if self.cycle is self._head_cycle and not self.transport.is_closing():  # no new request head
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head()

        def connection_lost(self, exc):
            self._cancel_head()
            super().connection_lost(exc)

        def handle_events(self):
            super().handle_events()
            if self._head_timer is not None and self.cycle is not self._head_cycle:
                self._cancel_head()  # a request head arrived in time

        def on_response_complete(self):
            if not self.transport.is_closing():
                self._arm_head()  # for the next request (super may handle a pipelined one at once)
            super().on_response_complete()

    return DeadlineH11Protocol


def serve(app, sock, options: ServeOptions, announce: Callable[[int], None] = lambda port: None) -> int:
    """Serve `app` (moejax.serving.api.create_app) on the bound socket `sock` until SIGINT /
    SIGTERM, then stop as the module says. `announce(port)` runs once connections are accepted.
    Returns EXIT_OK or EXIT_DROPPED."""
    import uvicorn

    options = options.validate()
    life = app.state.lifecycle

    class Server(uvicorn.Server):
        cut_connections = 0  # connections closed with their request unfinished
        why = ""

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own handler ignores a second SIGTERM and re-raises the signals once it has
            # stopped; here the second of either forces the stop, and nothing is re-raised
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                announce(self.servers[0].sockets[0].getsockname()[1])

        async def shutdown(self, sockets=None):
            loop = asyncio.get_running_loop()
            for server in self.servers:
                server.close()
            life.draining = True  # a request already on a connection is refused with a 503
            for connection in list(self.server_state.connections):
                connection.shutdown()  # idle ones close; busy ones close after their response
            tasks = self.server_state.tasks
            deadline = loop.time() + options.drain_timeout
            while tasks and not self.force_exit and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if tasks:
                self.why = ("a second signal stopped the drain" if self.force_exit else
                            f"the drain timeout ({options.drain_timeout:g} s) passed")
                life.cut(f"the server stopped before this request finished: {self.why}")
                grace = loop.time() + (1.0 if self.force_exit else CUT_GRACE_S)
                while tasks and loop.time() < grace:
                    await asyncio.sleep(0.02)
            for connection in list(self.server_state.connections):  # still busy: a client that does not read
                cycle = getattr(connection, "cycle", None)
                if cycle is not None and not cycle.response_complete:
                    self.cut_connections += 1
                    connection.transport.abort()
            if tasks:
                await asyncio.sleep(0.2)
                for t in list(tasks):
                    t.cancel()
                await asyncio.wait(list(tasks), timeout=1.0)
            flush = loop.time() + 1.0  # the last replies' bytes leave before the loop closes
            while self.server_state.connections and loop.time() < flush:
                await asyncio.sleep(0.02)

    config = uvicorn.Config(app, log_level="warning", lifespan="off", http=protocol_class(options.header_timeout),
                            limit_concurrency=options.limit_concurrency, timeout_keep_alive=options.timeout_keep_alive,
                            timeout_graceful_shutdown=None)
    server = Server(config)
    server.run(sockets=[sock])
    dropped = life.dropped + server.cut_connections
    if dropped:
        print(f"stopped ({server.why}): {life.dropped} request(s) ended with an error, "
              f"{server.cut_connections} connection(s) closed unfinished (exit code {EXIT_DROPPED})",
              file=sys.stderr, flush=True)
        return EXIT_DROPPED
    return EXIT_OK
