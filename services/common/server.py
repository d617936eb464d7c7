"""The gRPC server bootstrap every model service shares.

One interceptor does what would otherwise be repeated in each servicer: admin-token checks,
refusing new work while draining, request counting and latency, and mapping domain errors to
status codes (tracebacks go to the log, never to the client). :func:`run_service` starts the
server with health and reflection, loads the model in the background (health NOT_SERVING until
done), and on SIGTERM drains: NOT_SERVING, new calls refused with UNAVAILABLE, in-flight calls
given ``--grace`` seconds, then exit 0.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.client import MIN_PING_INTERVAL_MS
from services.common.errors import InvalidArgument, Unauthenticated, Unavailable, status_for
from services.common.metrics import ServiceMetrics
from services.common.settings import ServeSettings

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Calls that must keep working while loading and draining, and are not counted as work.
EXEMPT_PREFIXES = (f"/{HEALTH_SERVICE}/", f"/{reflection.SERVICE_NAME}/")


def server_options(max_message_bytes: int, *, min_ping_interval_ms: int | None = None) -> list[tuple[str, Any]]:
    """Explicit message-size limits (the gRPC defaults are 4 MiB receive, unlimited send), and
    a keepalive policy that accepts the clients' pings (services/common/client.py): by default a
    server allows one ping per 5 minutes on a connection without calls or data and answers more
    with GOAWAY "too_many_pings", while our clients ping every 30 s, idle or not."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a busy port is an error, not a silently shared socket
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms",
         MIN_PING_INTERVAL_MS if min_ping_interval_ms is None else min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def server_credentials(args: ServeSettings):
    """TLS (``--tls-cert``/``--tls-key``) or mutual TLS (plus ``--tls-client-ca``), else None."""
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    client_ca = getattr(args, "tls_client_ca", None)
    if not cert and not key:
        if client_ca:
            raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise SystemExit("TLS needs both --tls-cert and --tls-key")
    with open(key, "rb") as f:
        key_pem = f.read()
    with open(cert, "rb") as f:
        cert_pem = f.read()
    ca_pem = None
    if client_ca:
        with open(client_ca, "rb") as f:
            ca_pem = f.read()
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=bool(ca_pem))


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message (bad protobuf, invalid
    UTF-8 in a string field), so that the interceptor can answer INVALID_ARGUMENT instead of
    letting grpcio report UNKNOWN."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the client's input
            return _Undecodable(exc)

    return decode


def _check_decoded(request) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a valid message: {type(request.error).__name__}")


class Lifecycle:
    """Draining flag and in-flight counter shared by the interceptor and the bootstrap."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Auth for admin methods, drain refusal, metrics and error mapping for every RPC.

    Admin methods need ``authorization: Bearer <admin_token>`` (compared in constant time);
    without a configured token they are refused, never open."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        lifecycle: Lifecycle,
        *,
        admin_token: str | None = None,
        admin_methods: frozenset[str] = frozenset(),
        long_lived_methods: frozenset[str] = frozenset(),
    ):
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.admin_token = admin_token
        self.admin_methods = admin_methods
        self.long_lived = long_lived_methods

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        short = method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                started = self._begin(method, metadata)
                code = grpc.StatusCode.OK
                try:
                    self._admit(method, metadata)
                    _check_decoded(request)
                    return await inner(request, context)
                except BaseException as exc:
                    code = self._classify(exc, context, method)
                    await self._abort(exc, context, code)
                    raise
                finally:
                    self._end(short, method, started, code)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request, context) -> AsyncIterator[Any]:
                started = self._begin(method, metadata)
                code = grpc.StatusCode.OK
                try:
                    self._admit(method, metadata)
                    _check_decoded(request)
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException as exc:
                    code = self._classify(exc, context, method)
                    await self._abort(exc, context, code)
                    raise
                finally:
                    self._end(short, method, started, code)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler  # client-streaming methods are not part of the contracts

    # -- helpers -----------------------------------------------------------------------

    def _begin(self, method: str, metadata: dict) -> float:
        if method not in self.long_lived:
            self.lifecycle.in_flight += 1
            self.metrics.in_flight.labels(self.metrics.service).inc()
        return time.perf_counter()

    def _end(self, short: str, method: str, started: float, code: grpc.StatusCode) -> None:
        if method not in self.long_lived:
            self.lifecycle.in_flight -= 1
            self.metrics.in_flight.labels(self.metrics.service).dec()
        self.metrics.requests.labels(self.metrics.service, short, code.name).inc()
        self.metrics.latency.labels(self.metrics.service, short).observe(time.perf_counter() - started)

    def _admit(self, method: str, metadata: dict) -> None:
        if self.lifecycle.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        if method in self.admin_methods:
            if not self.admin_token:
                raise Unauthenticated("admin calls are disabled: this service was started without an admin "
                                      "token (PALM_RLHF_ADMIN_TOKEN or PALM_RLHF_ADMIN_TOKEN_FILE)")
            given = str(metadata.get("authorization", ""))
            expected = f"Bearer {self.admin_token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise Unauthenticated("admin call: send metadata 'authorization: Bearer <admin token>'")

    def _classify(self, exc: BaseException, context, method: str) -> grpc.StatusCode:
        """The status code ``exc`` stands for; logs bugs with their traceback."""
        if isinstance(exc, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED
        if isinstance(exc, grpc.aio.AbortError):  # the servicer aborted explicitly
            return context.code() or grpc.StatusCode.UNKNOWN
        mapped = status_for(exc)
        if mapped is None:
            log.error("unhandled error in %s", method, exc_info=exc)
            return grpc.StatusCode.INTERNAL
        log.info("%s -> %s: %s", method, mapped[0].name, mapped[1])
        return mapped[0]

    @staticmethod
    async def _abort(exc: BaseException, context, code: grpc.StatusCode) -> None:
        """Replace ``exc`` by an abort with a client-safe message (raises AbortError)."""
        if isinstance(exc, (asyncio.CancelledError, grpc.aio.AbortError)):
            return
        mapped = status_for(exc) if isinstance(exc, Exception) else None
        message = mapped[1] if mapped else "internal server error (details are in the server log)"
        await context.abort(code, message, trailing_metadata=getattr(exc, "trailing_metadata", ()))


class ServiceApp(Protocol):
    """What a role provides to :func:`run_service`."""

    name: str
    metrics: ServiceMetrics
    service_names: tuple[str, ...]  # full gRPC service names, for health and reflection
    admin_methods: frozenset[str]  # full method paths that need the admin token
    long_lived_methods: frozenset[str]  # streams that do not hold up draining

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    async def load(self) -> None: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


def bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def serve_app(args: ServeSettings, app: ServiceApp, started: Callable[[int, int | None], Awaitable[None] | None] | None = None) -> int:
    """Run ``app`` until SIGTERM/SIGINT; returns the process exit status."""
    lifecycle = Lifecycle()
    interceptor = ServiceInterceptor(
        app.metrics, lifecycle, admin_token=args.admin_token, admin_methods=app.admin_methods,
        long_lived_methods=app.long_lived_methods,
    )
    server = grpc.aio.server(interceptors=[interceptor], options=server_options(args.max_message_bytes))
    app.add_to_server(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *app.service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*app.service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    try:
        creds = server_credentials(args)
        if creds is None:
            port = server.add_insecure_port(bind_address(args.host, args.port))
        else:
            port = server.add_secure_port(bind_address(args.host, args.port), creds)
    except RuntimeError as e:
        log.error("%s: cannot bind %s: %s", app.name, bind_address(args.host, args.port), e)
        return 1
    if not port:
        log.error("%s: cannot bind %s (in use?)", app.name, bind_address(args.host, args.port))
        return 1
    await server.start()
    try:
        metrics_port = app.metrics.serve_http(args.host, args.metrics_port)
    except OSError as e:
        log.error("%s: cannot serve metrics on port %s: %s", app.name, args.metrics_port, e)
        await server.stop(0)
        return 1
    metrics_text = f"http://{bind_address(args.host, metrics_port)}/metrics" if metrics_port else "off"
    # One machine-parsable line on stdout: tests and the supervisor read the bound ports here.
    print(f"{app.name} listening on {bind_address(args.host, port)} (grpc), metrics {metrics_text}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    load_task = asyncio.create_task(app.load())
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if load_task.done():
        if load_task.exception() is not None:
            log.error("%s: failed to load: %s", app.name, load_task.exception(), exc_info=load_task.exception())
            status = 1
            stop.set()
        else:
            for name in ["", *app.service_names]:
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            app.metrics.ready.labels(app.name).set(1)
            log.info("%s ready on port %d", app.name, port)
            print(f"{app.name} ready", flush=True)
    await stop.wait()

    # Drain: report NOT_SERVING, refuse new work, give in-flight calls the grace period.
    log.info("%s draining (grace %.1fs)", app.name, args.grace)
    lifecycle.draining = True
    app.metrics.ready.labels(app.name).set(0)
    await health_servicer.enter_graceful_shutdown()
    await app.drain()
    t0 = time.monotonic()
    deadline, min_end = t0 + args.grace, t0 + args.drain_delay
    while time.monotonic() < min_end or (lifecycle.in_flight > 0 and time.monotonic() < deadline):
        await asyncio.sleep(0.02)
    await server.stop(max(0.0, deadline - time.monotonic()))
    if not load_task.done():
        load_task.cancel()
    await app.close()
    log.info("%s stopped", app.name)
    return status


async def check_health(channel: grpc.aio.Channel, service: str = "", timeout: float = 2.0) -> int:
    """The health status enum of ``service`` on ``channel`` (raises grpc.RpcError when unreachable)."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return reply.status
