"""``distrifusion demo``: a web page for the served pipeline, and the small proxy behind it.

Triton answers no browser (no CORS, gRPC streams), so the page talks to this server on the same origin:

    GET  /                          the page (``page.html``)
    POST /api/generate              JSON settings -> {"id": ...}; 400 naming the field, 429 when busy
    GET  /api/jobs/<id>             progress: state, step, steps, seconds, exchange wait, previews, error
    GET  /api/jobs/<id>/preview.png the latest preview (latent resolution)
    GET  /api/jobs/<id>/image.png   the final image (a download with ?download=1)
    POST /api/jobs/<id>/stop        cancels the stream: the server stops the rank group at the next step

Listens on 127.0.0.1 unless told otherwise, like ``distrifusion serve``.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .jobs import BusyError, Jobs, Settings, SettingsError

log = logging.getLogger("distrifusion.demo")

MAX_BODY_BYTES = 16 * 1024
_JOB_PATH = re.compile(r"^/api/jobs/([0-9a-f]{16})(/preview\.png|/image\.png|/stop)?$")


def page_html() -> bytes:
    return (importlib.resources.files("python_backend.demo") / "page.html").read_bytes()


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], jobs: Jobs):
        self.jobs = jobs
        self.page = page_html()
        super().__init__(address, DemoHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class DemoHandler(BaseHTTPRequestHandler):
    server: DemoServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path, _, query = self.path.partition("?")
        if path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        match = _JOB_PATH.match(path)
        job = self.server.jobs.get(match.group(1)) if match else None
        if match is None or match.group(2) == "/stop":
            return self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        if job is None:
            return self._error(HTTPStatus.NOT_FOUND, "no such generation (finished ones are forgotten after a while)")
        if match.group(2) is None:
            return self._json(HTTPStatus.OK, job.status())
        png = job.preview_png if match.group(2) == "/preview.png" else job.image_png
        if png is None:
            return self._error(HTTPStatus.NOT_FOUND, "not there yet")
        extra = {"Content-Disposition": 'attachment; filename="distrifusion.png"'} if "download=1" in query else None
        self._send(HTTPStatus.OK, png, "image/png", extra)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {MAX_BODY_BYTES} bytes")
        body = self.rfile.read(length) if length else b""
        if self.path == "/api/generate":
            try:
                settings = Settings.from_json(json.loads(body or b"null"))
                job = self.server.jobs.start(settings)
            except json.JSONDecodeError as error:
                return self._error(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {error}")
            except SettingsError as error:
                return self._error(HTTPStatus.BAD_REQUEST, str(error))
            except BusyError as error:
                return self._error(HTTPStatus.TOO_MANY_REQUESTS, str(error))
            log.info("generation %s started: %r", job.id, settings.prompt)
            return self._json(HTTPStatus.OK, {"id": job.id})
        match = _JOB_PATH.match(self.path)
        if match is None or match.group(2) != "/stop":
            return self._error(HTTPStatus.NOT_FOUND, f"no such action: {self.path}")
        job = self.server.jobs.stop(match.group(1))
        if job is None:
            return self._error(HTTPStatus.NOT_FOUND, "no such generation")
        log.info("generation %s: stop asked at step %d", job.id, job.step)
        self._json(HTTPStatus.OK, job.status())


def start_demo(triton_grpc_url: str, host: str = "127.0.0.1", port: int = 7860,
               timeout: float | None = None) -> tuple[DemoServer, threading.Thread]:
    """The demo server, already listening (port 0: any free port), served on a background thread."""
    server = DemoServer((host, port), Jobs(triton_grpc_url, timeout))
    thread = threading.Thread(target=server.serve_forever, name="demo-http", daemon=True)
    thread.start()
    return server, thread


def stop_demo(server: DemoServer) -> None:
    server.jobs.stop_all()
    server.shutdown()
    server.server_close()
