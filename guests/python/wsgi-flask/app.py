"""A Flask app served through the WSGI bridge, for the host's tests: each route exercises one
part of it (tests/wsgi.rs)."""

import sys

from flask import Flask, Response, jsonify, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

app = Flask(__name__)

# One entry for each /close response whose iterable was closed, which /close?check reads on a
# kept instance.
CLOSED = []


@app.get("/")
def hello():
    return "Hello from Flask\n"


@app.post("/echo")
def echo():
    """The request body streamed back as it is read, 64 KiB at a time."""
    stream = request.stream

    def chunks():
        while chunk := stream.read(64 * 1024):
            yield chunk

    return Response(chunks(), mimetype="application/octet-stream")


@app.post("/count")
def count():
    """The length of the request body, read 64 KiB at a time."""
    total = 0
    while chunk := request.stream.read(64 * 1024):
        total += len(chunk)
    return f"{total}\n"


@app.route("/environ", methods=["GET", "POST"])
def environ():
    """The environ keys a test checks, and what wsgi.input gives line by line."""
    keys = ["SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_LENGTH", "CONTENT_TYPE",
            "REMOTE_ADDR", "SERVER_NAME", "SERVER_PORT", "REQUEST_METHOD", "wsgi.url_scheme",
            "wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once", "wsgi.input_terminated"]
    seen = {key: request.environ.get(key) for key in keys}
    seen.update((key, value) for key, value in request.environ.items() if key.startswith("HTTP_"))
    seen["lines"] = [line.decode("latin-1") for line in request.environ["wsgi.input"]]
    seen["url"] = request.url
    return jsonify(seen)


@app.get("/stream")
def stream():
    """?mib=N MiB, made 64 KiB at a time as the client takes them."""
    mib = request.args.get("mib", 1, type=int)
    chunk = b"x" * (64 * 1024)

    def chunks():
        for _ in range(mib * 16):
            yield chunk

    return Response(chunks(), mimetype="application/octet-stream",
                    headers={"Content-Length": str(mib << 20)})


@app.get("/fail")
def fail():
    raise RuntimeError("the /fail route fails on purpose")


@app.get("/fail-before-body")
def fail_before_body():
    """A streamed response that fails before its first chunk: the exception leaves Flask."""

    def chunks():
        raise RuntimeError("the /fail-before-body route fails on purpose")
        yield b""

    return Response(chunks())


@app.get("/fail-midway")
def fail_midway():
    """1 MiB of a 200, then an exception."""

    def chunks():
        for _ in range(16):
            yield b"y" * (64 * 1024)
        raise RuntimeError("the /fail-midway route fails on purpose")

    return Response(chunks(), mimetype="application/octet-stream")


class Recorded:
    """A response iterable that records its close()."""

    def __iter__(self):
        yield b"closing\n"

    def close(self):
        CLOSED.append(True)


@app.get("/close")
def close():
    if "check" in request.args:
        return f"closed {len(CLOSED)}\n"
    return Response(Recorded(), mimetype="text/plain")


@app.get("/errors")
def errors():
    request.environ["wsgi.errors"].write(f"a line for wsgi.errors from {request.path}\n")
    return "written\n"


def raw(environ, start_response):
    """A WSGI app without Flask, at /raw, for what Flask does not use: the write() callable,
    and start_response called again with exc_info, before the body (/raw/replaced) and after
    it began (/raw/late)."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    if environ["PATH_INFO"] == "/replaced":
        try:
            raise ValueError("replaced on purpose")
        except ValueError:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")],
                           sys.exc_info())
        return [b"replaced\n"]
    write(b"written, ")
    if environ["PATH_INFO"] == "/late":
        try:
            raise ValueError("too late on purpose")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
    return [b"then returned\n"]


app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/raw": raw})
