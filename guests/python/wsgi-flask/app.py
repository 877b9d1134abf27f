"""A Flask app served through the WSGI bridge, for the host's tests: each route exercises one
part of it (tests/wsgi.rs)."""

import io
import sys

from flask import Flask, Response, jsonify, request, send_file
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.wsgi import wrap_file

from host_capabilities import HostCapabilityError, crypto, hmac_registry, objects, sql

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


# -- host_capabilities ----------------------------------------------------------------------------


@app.get("/capabilities/errors")
def capability_errors():
    """What a WIT error becomes in Python: for each call, the exception's class, the classes it
    is an instance of, and its fields."""
    seen = {}
    sql.execute("CREATE TABLE IF NOT EXISTS once (name TEXT NOT NULL UNIQUE)")
    sql.execute("DELETE FROM once")
    sql.execute("INSERT INTO once (name) VALUES ($1)", ["taken"])
    calls = {
        "duplicate": lambda: sql.execute("INSERT INTO once (name) VALUES ($1)", ["taken"]),
        "syntax": lambda: sql.query("SELEC 1"),
        "missing_object": lambda: objects.get("no/such/object"),
        "unknown_entry": lambda: hmac_registry.tag("no-such-entry"),
        "bad_key": lambda: crypto.encrypt("not-a-key-id", b"\0" * 16, 0, b"x"),
    }
    for name, call in calls.items():
        try:
            call()
            seen[name] = None
        except HostCapabilityError as error:
            seen[name] = {
                "class": f"{type(error).__module__}.{type(error).__qualname__}",
                "capability_error": isinstance(
                    error, (sql.SqlError, objects.ObjectError, hmac_registry.RegistryError,
                            crypto.CryptoError)
                ),
                "fields": {
                    key: value for key, value in vars(error).items() if not key.startswith("_")
                },
            }
    # A transaction that raises is rolled back: the row it inserted is gone.
    try:
        with sql.transaction() as tx:
            tx.execute("INSERT INTO once (name) VALUES ($1)", ["rolled back"])
            raise ValueError("undo")
    except ValueError:
        pass
    seen["after_rollback"] = [row["name"] for row in sql.query("SELECT name FROM once")]
    return jsonify(seen)


# An object of the test's own, stored by /capabilities/upload.
KEY = "capabilities/object"


@app.put("/capabilities/upload")
def capability_upload():
    """The request body, as one part, through crypto.encrypt_stream, hmac_registry.tap and
    objects.upload_part, all inside the host: none of it enters Python (the test sends more
    than the instance's memory limit)."""
    sql.execute("CREATE TABLE IF NOT EXISTS keys (name TEXT PRIMARY KEY, key_id TEXT)")
    keys = {"encryption": crypto.generate_key(), "mac": crypto.generate_key()}
    with sql.transaction() as tx:
        tx.execute("DELETE FROM keys")
        for name, key_id in keys.items():
            tx.execute("INSERT INTO keys (name, key_id) VALUES ($1, $2)", [name, key_id])
    hmac_registry.discard("object")
    hmac_registry.begin("object", keys["mac"])
    upload_id = objects.create_multipart(KEY)
    # Flask's request.stream is the bridge's wsgi.input.
    ciphertext = crypto.encrypt_stream(keys["encryption"], b"\1" * 16, 0, request.stream)
    tapped, mac = hmac_registry.tap("object", 1, ciphertext)
    stored = objects.upload_part(KEY, upload_id, 1, tapped, request.content_length)
    hmac_registry.add_part("object", mac, stored.etag)
    parts = objects.list_parts(KEY, upload_id)
    tag = hmac_registry.finish("object", parts)
    info = objects.complete_multipart(KEY, upload_id, parts)
    return jsonify({"size": info.size, "hmac": tag})


@app.get("/capabilities/download")
def capability_download():
    """The object back: objects.get, verified and decrypted inside the host, and spliced into
    the response by wsgi.file_wrapper, which Flask's send_file uses."""
    keys = {row.name: row.key_id for row in sql.query("SELECT name, key_id FROM keys")}
    info, stored = objects.get(KEY)
    verified = hmac_registry.verify_stream("object", 1, stored)
    plaintext = crypto.decrypt_stream(keys["encryption"], b"\1" * 16, 0, verified)
    response = send_file(plaintext, mimetype="application/octet-stream")
    # send_file knows the length of files it can stat, not of a stream.
    response.content_length = info.size
    return response


@app.get("/capabilities/wrapped-bytes")
def wrapped_bytes():
    """wsgi.file_wrapper over a file that is not the host's: read in chunks through Python."""
    data = b"0123456789" * 100_000
    return Response(wrap_file(request.environ, io.BytesIO(data), 4096),
                    mimetype="application/octet-stream", direct_passthrough=True)


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
