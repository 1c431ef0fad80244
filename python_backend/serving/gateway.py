"""The deployment's public HTTP and gRPC endpoints: a small proxy in front of tritonserver's loopback ones.

tritonserver 2.51 cannot do four things a served deployment needs, so the gateway does them:

* **Request body limit.** Triton reads any body whole and copies it into the Python backend's shared
  memory (whose regions then stay at that size) before a model can refuse it. The gateway answers a
  body over ``max_request_bytes`` with HTTP 413 (gRPC: RESOURCE_EXHAUSTED) before reading it into
  memory; Triton never sees it.
* **Client gone = work stopped.** Triton passes neither an HTTP disconnect nor an ensemble's gRPC
  cancellation to its models. The gateway tags every request to :data:`CANCELLABLE_MODELS` with a
  cancel key and marks it when the client disconnects or cancels before the answer (``signals.py``):
  the denoiser then never starts it (queued) or stops at the next step (running).
* **Truthful readiness.** ``GET /v2/health/ready`` and gRPC ``ServerReady`` also ask ``readiness()``
  (the server's own checks: every Python backend stub alive, the rank group up), which Triton's answer
  does not cover.
* **Request ids bounded.** Triton echoes a request's id in its own error messages and logs before any
  model can refuse it: an id longer than the deployment's ``max_request_id_chars`` is answered 400
  (gRPC INVALID_ARGUMENT) here. (Each model checks it too, for clients of tritonserver's own port.)
* Everything else passes through unchanged, headers (the admin key) and status codes included.

HTTP runs on an asyncio loop in a thread of its own (one upstream connection per client connection,
keep-alive on both sides, ``Expect: 100-continue`` answered here, chunked bodies de-chunked within the
limit); gRPC is a grpcio server with a generic handler that forwards raw messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable

import grpc

from .signals import CANCEL_PARAMETER, CANCELLABLE_MODELS, CancelMarkers

log = logging.getLogger("distrifusion.gateway")

MAX_HEAD_BYTES = 64 * 1024
"""The longest HTTP request line plus headers accepted (431 above)."""
DRAIN_LIMIT_BYTES = 1 << 30
"""A refused body up to this size is read and discarded so that the client reads the 413; a larger one
is refused and the connection closed at once."""
GRPC_THREADS = 64
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
               "expect", "content-length", "proxy-authenticate", "proxy-authorization"}
_INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/?]+)(?:/versions/[^/?]+)?/infer$")
_GRPC_SERVICE = "/inference.GRPCInferenceService/"
Readiness = Callable[[], list[str]]


LINGER_SECONDS = 2.0  # after refusing a request it closes on, the most time spent reading what the client still sends
LINGER_BYTES = 64 * 1024 * 1024  # ... and the most bytes


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads and drops what the client is still sending, for a moment, before the connection closes after a
    refusal (a lingering close, RFC 9112 section 9.6): closing with unread data makes the kernel reset the
    connection, and a client still sending (the rest of an oversized chunked body) would then lose the
    answer that names its mistake."""
    loop = asyncio.get_running_loop()
    deadline, dropped = loop.time() + LINGER_SECONDS, 0
    # the client hanging up or staying silent past the deadline both just end the lingering: the caller closes
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        if writer.can_write_eof():
            writer.write_eof()
        while dropped < LINGER_BYTES and (remaining := deadline - loop.time()) > 0:
            data = await asyncio.wait_for(reader.read(65536), remaining)
            if not data:
                return
            dropped += len(data)


class _Refused(Exception):
    """An HTTP request answered by the gateway itself with ``status`` and a JSON error."""

    def __init__(self, status: int, reason: str, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.reason, self.message, self.close = status, reason, message, close


def body_limit_message(size: int, limit: int) -> str:
    return (f"request body of {size} bytes is larger than this deployment's limit of {limit} bytes "
            "(max_request_bytes)")


# --------------------------------------------------------------------------------------------------
# HTTP/1.1 messages


@dataclass
class _Message:
    start: str  # request line or status line
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for t in (self.header(name) or "").split(",") if t.strip()}

    def encode(self, extra: list[tuple[str, str]] = ()) -> bytes:
        kept = [(k, v) for k, v in self.headers if k.lower() not in _HOP_BY_HOP]
        lines = [self.start, *(f"{k}: {v}" for k, v in kept + list(extra))]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def _parse_head(raw: bytes) -> _Message:
    try:
        lines = raw.decode("latin-1").split("\r\n")
    except UnicodeDecodeError:
        raise _Refused(400, "Bad Request", "malformed request head", close=True) from None
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise _Refused(400, "Bad Request", f"malformed header line {line[:80]!r}", close=True)
        headers.append((name, value.strip()))
    return _Message(lines[0], headers)


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The next message head, or None when the peer closed between messages."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as partial:
        if not partial.partial.strip():
            return None
        raise
    except asyncio.LimitOverrunError:
        raise _Refused(431, "Request Header Fields Too Large",
                       f"request line and headers are longer than {MAX_HEAD_BYTES} bytes", close=True) from None


async def _read_chunked(reader: asyncio.StreamReader, limit: int | None) -> bytes:
    parts, size = [], 0
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            length = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise _Refused(400, "Bad Request", "malformed chunk size in a chunked body", close=True) from None
        if length == 0:
            trailer = await reader.readuntil(b"\r\n")
            while trailer != b"\r\n":  # trailer fields, up to the empty line: ignored
                trailer = await reader.readuntil(b"\r\n")
            return b"".join(parts)
        size += length
        if limit is not None and size > limit:
            raise _Refused(413, "Payload Too Large", body_limit_message(size, limit) + " (chunked body)", close=True)
        parts.append(await reader.readexactly(length))
        await reader.readexactly(2)


async def _read_body(message: _Message, reader: asyncio.StreamReader, limit: int | None,
                     writer: asyncio.StreamWriter | None = None) -> bytes:
    """The body of a request (``writer``: answer ``Expect: 100-continue`` there) or of a response."""
    if "chunked" in message.tokens("transfer-encoding"):
        if writer is not None and "100-continue" in message.tokens("expect"):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await _read_chunked(reader, limit)
    length_text = message.header("content-length")
    if length_text is None:
        return b"" if writer is not None else await reader.read()  # a response without a length ends at close
    try:
        length = int(length_text)
        if length < 0:
            raise ValueError
    except ValueError:
        raise _Refused(400, "Bad Request", f"invalid Content-Length {length_text!r}", close=True) from None
    if limit is not None and length > limit:
        expecting = "100-continue" in message.tokens("expect")
        if not expecting and length <= DRAIN_LIMIT_BYTES:
            await _discard(reader, length)  # so that a client that sends first and reads after sees the 413
        raise _Refused(413, "Payload Too Large", body_limit_message(length, limit), close=True)
    if writer is not None and length and "100-continue" in message.tokens("expect"):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return await reader.readexactly(length)


async def _discard(reader: asyncio.StreamReader, length: int, chunk: int = 1 << 20) -> None:
    while length > 0:
        data = await reader.read(min(chunk, length))
        if not data:
            return
        length -= len(data)


def _error_response(status: int, reason: str, message: str, close: bool) -> bytes:
    body = json.dumps({"error": message}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    if close:
        headers.append(("Connection", "close"))
    return _Message(f"HTTP/1.1 {status} {reason}", [], body).encode(headers)


def _keeps_alive(message: _Message) -> bool:
    version = message.start.rsplit(" ", 1)[-1] if " " in message.start else ""
    connection = message.tokens("connection")
    if version == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


def request_id_message(length: int, limit: int) -> str:
    return f"request 'id' is {length} characters long; allowed: at most {limit}"


def _infer_document(message: _Message) -> tuple[dict | None, int]:
    """The JSON object an inference body starts with (the whole body, or its first
    ``Inference-Header-Content-Length`` bytes with the binary extension) and its length; None if the
    body is no JSON object (Triton refuses it then)."""
    header_length = message.header("inference-header-content-length")
    try:
        split = int(header_length) if header_length is not None else len(message.body)
        document = json.loads(message.body[:split])
    except ValueError:
        return None, 0
    return (document, split) if isinstance(document, dict) else (None, 0)


def check_http_request_id(message: _Message, max_chars: int) -> None:
    """Triton echoes a request's id in its own error messages, before any model sees the request."""
    document, _ = _infer_document(message)
    request_id = document.get("id") if document is not None else None
    if isinstance(request_id, str) and len(request_id) > max_chars:
        raise _Refused(400, "Bad Request", request_id_message(len(request_id), max_chars))


def tag_http_infer_body(message: _Message, key: str) -> bytes:
    """The request body with ``key`` as the :data:`CANCEL_PARAMETER` request parameter (the JSON part of
    a binary-extension body rewritten, ``Inference-Header-Content-Length`` updated); unchanged if it
    is not a JSON object (Triton refuses it then)."""
    body = message.body
    document, split = _infer_document(message)
    if document is None:
        return body
    header_length = message.header("inference-header-content-length")
    parameters = document.setdefault("parameters", {})
    if not isinstance(parameters, dict):
        return body
    parameters[CANCEL_PARAMETER] = key
    encoded = json.dumps(document, separators=(",", ":")).encode()
    if header_length is not None:
        message.headers = [(k, str(len(encoded)) if k.lower() == "inference-header-content-length" else v)
                           for k, v in message.headers]
    return encoded + body[split:]


# --------------------------------------------------------------------------------------------------
# HTTP front


class _Upstream:
    """One connection to tritonserver's HTTP port, opened on first use and reopened after a close."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def exchange(self, request: bytes, head_only: bool) -> _Message:
        if self.writer is None:
            try:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=MAX_HEAD_BYTES * 4)
            except OSError:
                raise _Refused(503, "Service Unavailable",
                               "the inference server is not reachable (starting or stopping)") from None
        try:
            self.writer.write(request)
            await self.writer.drain()
            while True:
                head = await _read_head(self.reader)
                if head is None:
                    raise ConnectionResetError("tritonserver closed the connection")
                response = _parse_head(head)
                if not response.start.split(" ")[1:2] == ["100"]:
                    break
            status = int(response.start.split(" ")[1])
            if not (head_only or status in (204, 304)):
                response.body = await _read_body(response, self.reader, None)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            self.close()
            raise _Refused(502, "Bad Gateway", "the inference server closed the connection", close=True) from None
        if not _keeps_alive(response) or response.header("content-length") is None \
                and "chunked" not in response.tokens("transfer-encoding"):
            self.close()
        return response

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class HttpFront:
    def __init__(self, host: str, port: int, upstream: tuple[str, int], limits: "Limits",
                 markers: CancelMarkers, readiness: Readiness, cancellable=CANCELLABLE_MODELS):
        self.host, self.port, self.upstream = host, port, upstream
        self.limits, self.cancellable = limits, tuple(cancellable)
        self.markers, self.readiness = markers, readiness
        self.loop = asyncio.new_event_loop()
        self._server = None
        self._connections: set[asyncio.Task] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gateway-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result()

    async def _listen(self):
        return await asyncio.start_server(self._connection, self.host, self.port, limit=MAX_HEAD_BYTES,
                                          reuse_address=True)

    def stop(self) -> None:
        async def close():
            if self._server is not None:
                self._server.close()
            for task in list(self._connections):  # each closes its client and upstream connections
                task.cancel()
            if self._connections:
                await asyncio.wait(list(self._connections), timeout=2)
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        upstream = _Upstream(*self.upstream)
        try:
            keep_open = True
            while keep_open:
                keep_open = await self._one_request(reader, writer, upstream)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass  # the client went away mid-message, or the gateway stops
        except Exception:  # a bug here must cost this connection only
            log.exception("the gateway dropped an HTTP connection after an unexpected error")
        finally:
            self._connections.discard(task)
            upstream.close()
            writer.close()

    async def _one_request(self, reader, writer, upstream: _Upstream) -> bool:
        """Serves one request; returns whether the connection stays open for another."""
        try:
            head = await _read_head(reader)
            if head is None:
                return False
            request = _parse_head(head)
            parts = request.start.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                raise _Refused(400, "Bad Request", f"malformed request line {request.start[:80]!r}", close=True)
            method, target = parts[0], parts[1]
            request.body = await _read_body(request, reader, self.limits.request_bytes, writer)
            keep = _keeps_alive(request)
            if method == "GET" and target.split("?")[0] == "/v2/health/ready":
                problems = await asyncio.get_running_loop().run_in_executor(None, self.readiness)
                if problems:
                    raise _Refused(503, "Service Unavailable", "not ready: " + "; ".join(problems))
            key = None
            match = _INFER_PATH.match(target.split("?")[0])
            if method == "POST" and match:
                check_http_request_id(request, self.limits.request_id_chars)
                if match["model"] in self.cancellable:
                    key = self.markers.new_key()
                    request.body = tag_http_infer_body(request, key)
            outgoing = request.encode([("Content-Length", str(len(request.body)))])
            response = await self._forward(outgoing, method == "HEAD", reader, upstream, key)
            if response is None:
                return False  # the client left before the answer
            closing = not keep
            extra = [("Content-Length", str(len(response.body)))] if method != "HEAD" else []
            if method == "HEAD" and response.header("content-length"):
                extra = [("Content-Length", response.header("content-length"))]
            writer.write(response.encode(extra + ([("Connection", "close")] if closing else [])))
            await writer.drain()
            return not closing
        except _Refused as refused:
            writer.write(_error_response(refused.status, refused.reason, refused.message, refused.close))
            await writer.drain()
            if refused.close:
                await _linger(reader, writer)
            return not refused.close

    async def _forward(self, outgoing: bytes, head_only: bool, reader: asyncio.StreamReader,
                       upstream: _Upstream, key: str | None) -> _Message | None:
        """Tritonserver's answer, or None when the client disconnected first (its work is then marked
        cancelled until the server has answered)."""
        answer = asyncio.ensure_future(upstream.exchange(outgoing, head_only))
        if key is None:
            return await answer
        gone = asyncio.ensure_future(_client_gone(reader))
        try:
            done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done and gone.result():
                self.markers.mark(key)
                log.info("a client disconnected before its answer: its request is cancelled")
                await asyncio.gather(answer, return_exceptions=True)  # its answer or error goes nowhere now
                return None
            return await answer
        finally:
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)  # its wait on the reader is over before the next read
            self.markers.clear(key)


async def _client_gone(reader: asyncio.StreamReader) -> bool:
    """Waits until the client closes its side (True); a client that sends more instead is not gone."""
    while True:
        if reader._buffer:  # noqa: SLF001  (pipelined: the next request is already here)
            return False
        if reader.at_eof():
            return True
        await reader._wait_for_data("client_gone")  # noqa: SLF001  (waits without consuming pipelined data)


# --------------------------------------------------------------------------------------------------
# gRPC front


class GrpcFront:
    def __init__(self, host: str, port: int, upstream: tuple[str, int], limits: "Limits",
                 markers: CancelMarkers, readiness: Readiness, cancellable=CANCELLABLE_MODELS):
        from tritonclient.grpc import service_pb2

        self.pb = service_pb2
        self.host, self.port, self.limits, self.cancellable = host, port, limits, tuple(cancellable)
        self.markers, self.readiness = markers, readiness
        self.channel = grpc.insecure_channel(f"{upstream[0]}:{upstream[1]}", options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        self.server = grpc.server(futures.ThreadPoolExecutor(GRPC_THREADS, thread_name_prefix="gateway-grpc"),
                                  handlers=[_GrpcForwarder(self)], options=[
                                      ("grpc.max_receive_message_length", limits.request_bytes),
                                      ("grpc.max_send_message_length", -1),
                                      ("grpc.so_reuseport", 0)])

    def start(self) -> None:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.server.add_insecure_port(address) == 0:
            raise OSError(f"the gateway could not listen for gRPC on {address}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=0.5).wait(5)
        self.channel.close()

    def unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        if method == _GRPC_SERVICE + "ServerReady":
            problems = self.readiness()
            if problems:
                return self.pb.ServerReadyResponse(ready=False).SerializeToString()
        key = None
        if method == _GRPC_SERVICE + "ModelInfer":
            request, key = self._inspect(request, context)
        call = self.channel.unary_unary(method).future(request, metadata=_forwardable(context),
                                                       timeout=_deadline(context))
        answered = threading.Event()
        if key is not None:
            def on_end():
                if not answered.is_set():  # ended before the answer: cancelled by the client (or its deadline)
                    self.markers.mark(key)
                    log.info("a gRPC client cancelled before its answer: its request is cancelled")
            context.add_callback(on_end)
        try:
            return call.result()
        except grpc.RpcError as failure:
            context.abort(failure.code(), failure.details())
        finally:
            answered.set()
            if key is not None:
                self.markers.clear(key)

    def stream(self, method: str, requests, context: grpc.ServicerContext):
        call = self.channel.stream_stream(method)(requests, metadata=_forwardable(context),
                                                  timeout=_deadline(context))
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as failure:
            if failure.code() != grpc.StatusCode.CANCELLED:
                context.abort(failure.code(), failure.details())

    def _inspect(self, request: bytes, context: grpc.ServicerContext) -> tuple[bytes, str | None]:
        """The request to forward (tagged with a cancel key for :data:`CANCELLABLE_MODELS`) and its key;
        aborts the call if its id is too long."""
        message = self.pb.ModelInferRequest()
        try:
            message.ParseFromString(request)
        except Exception:  # protobuf's DecodeError; Triton answers a malformed message itself
            return request, None
        if len(message.id) > self.limits.request_id_chars:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          request_id_message(len(message.id), self.limits.request_id_chars))
        if message.model_name not in self.cancellable:
            return request, None
        key = self.markers.new_key()
        message.parameters[CANCEL_PARAMETER].string_param = key
        return message.SerializeToString(), key


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The client's remaining time, for the upstream call (grpcio reports "none" as a huge number)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e7 else remaining


def _forwardable(context: grpc.ServicerContext) -> list[tuple[str, str]]:
    return [(k, v) for k, v in context.invocation_metadata()
            if not k.startswith(("grpc-", ":")) and k not in ("user-agent", "te", "content-type")]


class _GrpcForwarder(grpc.GenericRpcHandler):
    def __init__(self, front: GrpcFront):
        self.front = front

    def service(self, details):
        method = details.method
        if method.endswith("/ModelStreamInfer"):
            return grpc.stream_stream_rpc_method_handler(lambda it, ctx: self.front.stream(method, it, ctx))
        return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self.front.unary(method, req, ctx))


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    request_bytes: int  # the largest request body (HTTP) or message (gRPC)
    request_id_chars: int  # the longest request id


class Gateway:
    """Both fronts over one tritonserver: public ``host:http_port`` and ``host:grpc_port`` forwarding to
    ``upstream_host``'s ``upstream_http_port`` / ``upstream_grpc_port``."""

    def __init__(self, host: str, http_port: int, grpc_port: int, upstream_host: str, upstream_http_port: int,
                 upstream_grpc_port: int, limits: Limits, markers: CancelMarkers,
                 readiness: Readiness = lambda: [], cancellable=CANCELLABLE_MODELS):
        """``cancellable``: the models whose requests get a cancel key."""
        self.limits = limits
        self.http = HttpFront(host, http_port, (upstream_host, upstream_http_port), limits, markers, readiness,
                              cancellable)
        self.grpc = GrpcFront(host, grpc_port, (upstream_host, upstream_grpc_port), limits, markers, readiness,
                              cancellable)

    def start(self) -> "Gateway":
        self.http.start()
        try:
            self.grpc.start()
        except BaseException:
            self.http.stop()
            raise
        log.info("gateway listening: HTTP %s:%d, gRPC %s:%d (request bodies up to %d bytes, ids up to %d "
                 "characters)", self.http.host, self.http.port, self.grpc.host, self.grpc.port,
                 self.limits.request_bytes, self.limits.request_id_chars)
        return self

    def stop(self) -> None:
        self.grpc.stop()
        self.http.stop()
