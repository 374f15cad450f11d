"""`septet serve`: an OpenAI-compatible HTTP API and a chat page, on the standard library.

    GET  /                      a chat page (streams from /v1/chat/completions)
    GET  /health                {"status": "ok", "model": ..., requests and batches so far}
    GET  /v1/models             the one model served
    POST /v1/completions        prompt -> text (stream: server-sent events)
    POST /v1/chat/completions   messages -> the assistant's message (stream: events)

One model, owned by one worker thread that decodes the requests in flight as one batch
(septet.serve.scheduler: up to --max-batch rows, each with its own sampling and stops; late
requests join the running batch). A bad request gets HTTP 400 with {"error": {"message",
"type", "param"}}; a body over 1 MB gets 413; a client that disconnects mid-stream leaves
the batch.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from ..api import LoadedModel
from ..errors import SeptetError
from . import openai
from .page import PAGE
from .scheduler import Job, Scheduler

MAX_BODY = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    server: "SeptetServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        if self.server.verbose:
            sys.stderr.write(f"septet serve: {self.address_string()} {fmt % args}\n")

    # --- responses --------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    # --- routes -------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (the http.server interface)
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(200, PAGE.replace("{{MODEL}}", self.server.model_name).encode(), "text/html; charset=utf-8")
        elif path == "/health":
            self._json(200, {"status": "ok", "model": self.server.model_name, **self.server.scheduler.stats})
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "septet"}]})
        else:
            self._error(404, f"no route GET {path}; see GET /v1/models, POST /v1/completions, "
                             "POST /v1/chat/completions", "not_found_error")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        parse: Callable | None = {"/v1/completions": openai.parse_completion,
                                  "/v1/chat/completions": openai.parse_chat}.get(path)
        if parse is None:
            self._error(404, f"no route POST {path}; use /v1/completions or /v1/chat/completions",
                        "not_found_error")
            return
        body = self._read_json()
        if body is None:
            return
        try:
            req = parse(body, self.server.lm, compile=self.server.compile)
        except SeptetError as e:  # RequestError, a chat template that rejects the messages, ...
            self._error(400, str(e))
            return
        job = self.server.scheduler.submit(req)
        if req.stream:
            self._stream(req, job)
            return
        try:
            text = "".join(job)
        except SeptetError as e:
            self._error(400, str(e))
            return
        except Exception as e:  # a bug, not the client's fault: say so in one line, keep serving
            self.log_error("generation failed: %s: %s", type(e).__name__, e)
            self._error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
            return
        self._json(200, openai.response(req, self.server.model_name, text, job))

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(411, "send the JSON body with a Content-Length header")
            return None
        if int(length) > MAX_BODY:
            self._error(413, f"the body is {length} bytes; the limit is {MAX_BODY}")
            return None
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._error(400, f"the body is not valid JSON: {e.msg if hasattr(e, 'msg') else e}")
            return None

    def _stream(self, req: openai.Request, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        name = self.server.model_name

        def event(obj: Any) -> None:
            self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
            self.wfile.flush()

        try:
            first = True
            for piece in job:
                event(openai.chunk(req, name, piece, first=first))
                first = False
            if first and req.chat:  # an empty answer still says who is speaking
                event(openai.chunk(req, name, "", first=True))
            event(openai.chunk(req, name, None, job))
            event(b"[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            job.close()  # the client left: the worker drops its row
        except Exception as e:  # the status line is sent: report in the stream, then end it
            self.log_error("generation failed: %s: %s", type(e).__name__, e)
            try:
                event({"error": {"message": f"generation failed: {type(e).__name__}: {e}",
                                 "type": "server_error", "param": None, "code": None}})
            except OSError:
                pass


class SeptetServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, lm: LoadedModel, host: str = "127.0.0.1", port: int = 8000, *,
                 model_name: str | None = None, verbose: bool = True, compile: bool = False,
                 max_batch: int = 8):
        self.lm, self.verbose, self.compile = lm, verbose, compile
        self.scheduler = Scheduler(lm, max_batch)
        self.model_name = model_name or lm.name or "septet"
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"
