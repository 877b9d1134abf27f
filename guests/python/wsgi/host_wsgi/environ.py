"""The WSGI environ of a wasi:http request, and `wsgi.input` over its body.

The guest is told what the host passes on after its proxy rules (`--forwarded-allow-ips`; the
README's "Proxy headers"), and the environ says the same as gunicorn's would:

- `wsgi.url_scheme` is the request's scheme, which the host makes `https` only when a trusted
  peer sent `X-Forwarded-Proto: https`;
- `SERVER_NAME` and `SERVER_PORT` come from the request's authority: its `Host`, or a trusted
  peer's `X-Forwarded-Host`;
- `REMOTE_ADDR` is the last address of `X-Forwarded-For`, which the host appends the peer's
  address to on every TCP connection, after dropping an untrusted peer's own list: the peer, as
  gunicorn gives it. On a unix socket the host appends nothing, so it is the last hop the proxy
  in front reported, or empty, as gunicorn leaves it there. `REMOTE_PORT` is not known to the
  guest and is not set;
- `SCRIPT_NAME` is the path prefix the app is mounted at (an `[[app]]`'s `path`), which the
  host takes off the path and passes in `X-Forwarded-Prefix` (or a trusted proxy's; the host
  removes a client's own); `PATH_INFO` is the rest, percent-decoded,
  and `RAW_URI` the path as the client sent it;
- `SERVER_PROTOCOL` is `HTTP/1.1`: wasi:http does not tell the version;
- headers become `HTTP_*` (`Content-Type` and `Content-Length` become `CONTENT_TYPE` and
  `CONTENT_LENGTH`), repeated ones joined by commas; a header whose name holds an underscore is
  dropped, as gunicorn does by default, since `X-Forwarded_For` would otherwise read as
  `X-Forwarded-For`. wasi:http itself never shows the guest `Host` (it is the authority) nor
  the hop-by-hop headers.

`wsgi.file_wrapper` is `host_wsgi.response.FileWrapper`, which splices host streams (from
host_capabilities) into the response inside the host. `wsgi.input` hands its stream to
host_capabilities' `request_body` (`RequestBody.take_input_stream`), so a capability can read
the body inside the host.

`wsgi.multithread` is False (an instance serves one request at a time) and
`wsgi.multiprocess` True (instances, one interpreter each, run the app side by side).
`wsgi.run_once` is False: whether an instance serves one request or many is the host's
`--instance-max-requests`, which the guest cannot see, and an app that set up work for later
requests only wastes it on a fresh instance, while one that skipped it would be slow on a kept
one.
"""

import sys
from urllib.parse import unquote_to_bytes

from componentize_py_types import Err
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import IncomingRequest, Scheme_Http, Scheme_Https

from host_wsgi.response import FileWrapper

# What one read of the body asks the stream for.
CHUNK = 64 * 1024


class BadRequest(Exception):
    """A request the app cannot be given; its message says why."""


def make_environ(request: IncomingRequest) -> tuple:
    """The environ of `request`, and its body (`wsgi.input`), which the caller releases."""
    with request.headers() as fields:
        entries = fields.entries()
    headers = {}
    for name, value in entries:
        headers.setdefault(name.lower(), []).append(value.decode("latin-1"))
    length = content_length(headers.pop("content-length", None))
    body = RequestBody(request, length)
    environ = wsgi_environ(
        method_name(request.method()),
        scheme_name(request.scheme()),
        request.authority() or "",
        request.path_with_query() or "/",
        headers,
        length,
        body,
    )
    return environ, body


def wsgi_environ(
    method: str, scheme: str, authority: str, path_with_query: str, headers: dict,
    length: "int | None", body,
) -> dict:
    """The environ of a request whose header fields are `headers` (lowercase names, each with
    its values, Content-Length taken out as `length`) and whose body is the file `body`."""
    server_name, server_port = split_authority(authority, scheme)
    path, _, query = path_with_query.partition("?")
    prefix = headers.get("x-forwarded-prefix", [""])[-1].rstrip("/")
    hops = ",".join(headers.get("x-forwarded-for", [])).split(",")
    environ = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": unquote_to_bytes(prefix).decode("latin-1"),
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query,
        "RAW_URI": prefix + path_with_query,
        "SERVER_NAME": server_name,
        "SERVER_PORT": server_port,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": hops[-1].strip(),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": body,
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.file_wrapper": FileWrapper,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if length is not None:
        environ["CONTENT_LENGTH"] = str(length)
    for name, values in headers.items():
        if "_" in name:
            continue
        key = name.upper().replace("-", "_")
        value = ("; " if name == "cookie" else ",").join(values)
        if key == "CONTENT_TYPE":
            environ[key] = value
        else:
            environ["HTTP_" + key] = value
    return environ


def content_length(values) -> "int | None":
    if values is None:
        return None
    # The same length repeated is one length (RFC 9110 §8.6); anything else is refused.
    lengths = {item.strip() for value in values for item in value.split(",")}
    if len(lengths) != 1:
        raise BadRequest(f"conflicting Content-Length values {', '.join(sorted(lengths))}")
    (length,) = lengths
    if not (length.isascii() and length.isdigit()):
        raise BadRequest(f"Content-Length {length!r} is not a number of bytes")
    return int(length)


def scheme_name(scheme) -> str:
    if isinstance(scheme, Scheme_Https):
        return "https"
    if scheme is None or isinstance(scheme, Scheme_Http):
        return "http"
    return scheme.value.lower()


def method_name(method) -> str:
    # Method_Get() … Method_Patch(), or Method_Other(value) for any other method.
    value = getattr(method, "value", None)
    return value if value is not None else type(method).__name__.partition("_")[2].upper()


def split_authority(authority: str, scheme: str) -> tuple:
    """`SERVER_NAME` and `SERVER_PORT` of `host[:port]` (or `[v6]:port`)."""
    host, port = authority, ""
    if authority.startswith("["):
        end = authority.find("]")
        if end >= 0:
            host, port = authority[: end + 1], authority[end + 1 :].lstrip(":")
    elif ":" in authority:
        host, _, port = authority.rpartition(":")
    return host, port or ("443" if scheme == "https" else "80")


class RequestBody:
    """`wsgi.input`: the request body as a binary file, read from the wasi stream only as the
    app asks, and never past `CONTENT_LENGTH` (a body without one, chunked, ends where the
    client ended it)."""

    def __init__(self, request: IncomingRequest, length: "int | None"):
        self._body = request.consume()
        self._stream = self._body.stream()
        self._left = length
        self._buffer = b""
        # What took the body's stream (take_input_stream), closed before the body is released.
        self._taker = None

    def read(self, size: "int | None" = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._take(len(self._buffer))]
            while chunk := self._more(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        parts = [self._take(size)]
        wanted = size - len(parts[0])
        while wanted > 0 and (chunk := self._more(wanted)):
            parts.append(chunk)
            wanted -= len(chunk)
        return b"".join(parts)

    def readline(self, size: "int | None" = -1) -> bytes:
        limit = size if size is not None and size >= 0 else None
        while True:
            newline = self._buffer.find(b"\n", 0, limit)
            if newline >= 0:
                return self._take(newline + 1)
            if limit is not None and len(self._buffer) >= limit:
                return self._take(limit)
            chunk = self._more(CHUNK)
            if not chunk:
                return self._take(len(self._buffer))
            self._buffer += chunk

    def readlines(self, hint: "int | None" = -1) -> list:
        lines, total = [], 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        while line := self.readline():
            yield line

    def take_input_stream(self, wrap):
        """Hands the rest of the body, the wasi:io input-stream itself, to `wrap(stream,
        length)` and returns what that makes (host_capabilities' `request_body` makes a Stream
        of it, which capabilities then read inside the host); reads here then find the end.
        What `wrap` made is closed before the body is released, as wasi:http requires."""
        if self._buffer:
            raise ValueError(
                "the request body cannot be handed on: some of it was already read into a buffer"
            )
        if self._stream is None or self._taker is not None:
            raise ValueError(
                "the request body cannot be handed on: it was already taken or released"
            )
        stream, self._stream = self._stream, None
        self._taker = wrap(stream, self._left)
        self._left = 0
        return self._taker

    def release(self) -> None:
        """Gives the stream and the body back to the host (the stream first, as wasi:http
        requires); reads then find the end."""
        if self._body is None:
            return
        if self._stream is not None:
            self._stream.__exit__(None, None, None)
            self._stream = None
        if self._taker is not None:
            # Closing what took the stream drops it, unless it went on to the host already.
            self._taker.close()
            self._taker = None
        self._body.__exit__(None, None, None)
        self._body = None
        self._left = 0

    def _take(self, size: int) -> bytes:
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken

    def _more(self, size: int) -> bytes:
        """Up to `size` more bytes of the body; b"" at its end."""
        if self._left is not None:
            size = min(size, self._left)
        if size <= 0 or self._stream is None:
            return b""
        data = b""
        while not data:
            try:
                data = self._stream.blocking_read(size)
            except Err as error:
                if isinstance(error.value, StreamError_Closed):
                    self._left = 0
                    return b""
                raise OSError(
                    f"the request body could not be read: {error.value.value.to_debug_string()}"
                ) from None
        if self._left is not None:
            self._left -= len(data)
        return data
