"""`start_response`, and the app's body written to the client as the app produces it."""

from componentize_py_types import Err, Ok
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import Fields, OutgoingBody, OutgoingResponse, ResponseOutparam

# What wasi:http refuses in a response: the hop-by-hop headers and the host's own `Host`.
# gunicorn drops the hop-by-hop headers an app sends instead of failing its response; so does
# the bridge.
DROPPED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "host",
        "http2-settings",
    }
)


class Response:
    """One request's response. Its head goes out with the first non-empty chunk of the body
    (or at its end), so that until then the app may still replace it (`exc_info`)."""

    def __init__(self, response_out: ResponseOutparam, head_only: bool):
        self._out = response_out
        # A HEAD response carries no body: what the app yields for one is not sent.
        self._head_only = head_only
        self._status = None
        self._headers = None
        self._body = None
        self._stream = None
        self._writable = None

    def start_response(self, status: str, headers: list, exc_info=None):
        if exc_info is not None:
            try:
                if self._body is not None:
                    # Too late to replace the head: the error goes on, and the host cuts the
                    # response.
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self._status is not None:
            raise RuntimeError("start_response was called again without exc_info")
        self._status = status_code(status)
        self._headers = header_list(headers)
        return self.write

    def write(self, data: bytes) -> None:
        """Sends `data` now (the `write` callable of `start_response`, and each chunk of the
        app's iterable)."""
        if not isinstance(data, bytes):
            raise TypeError(f"a WSGI body is bytes, not {type(data).__name__}")
        if not data:
            return
        self._send_head()
        if not self._head_only:
            self._write_all(data)

    def finish(self) -> None:
        self._send_head()
        self._writable.__exit__(None, None, None)
        self._stream.__exit__(None, None, None)
        try:
            OutgoingBody.finish(self._body, None)
        except Err as error:
            raise ValueError(
                f"the response body does not match its Content-Length ({error.value})"
            ) from None

    def _send_head(self) -> None:
        if self._body is not None:
            return
        if self._status is None:
            raise RuntimeError("the app returned a body without calling start_response")
        fields = Fields()
        for name, value in self._headers:
            # wasi:http holds a body to the length its head declares, and a HEAD response has
            # no body: its Content-Length is left out (gunicorn would pass it on).
            if self._head_only and name == "content-length":
                continue
            try:
                fields.append(name, value)
            except Err as error:
                raise ValueError(
                    f"the response header {name!r}: {value!r} is refused ({error.value})"
                ) from None
        response = OutgoingResponse(fields)
        try:
            response.set_status_code(self._status)
        except Err:
            raise ValueError(f"the response status {self._status} is not an HTTP status") from None
        self._body = response.body()
        ResponseOutparam.set(self._out, Ok(response))
        self._stream = self._body.write()
        self._writable = self._stream.subscribe()

    def _write_all(self, data: bytes) -> None:
        """Writes as much as the stream takes at once (what its check-write allows: 1 MiB with
        wasmtime-wasi-http's defaults, where a blocking write takes at most 4 KiB; 64 MiB went
        out in 0.08 s this way, in 0.23 s in blocking writes), waiting while the client catches
        up. componentize-py 0.25.1 keeps a copy of every byte written until the instance ends
        (its runtime never frees a byte string passed to an import): a response costs its size
        in the instance's memory, however it is written."""
        offset = 0
        try:
            while offset < len(data):
                allowed = self._stream.check_write()
                if allowed == 0:
                    self._writable.block()
                    continue
                end = min(offset + allowed, len(data))
                # A whole chunk (the usual case) is passed as it is: bytes[0:len] is no copy.
                self._stream.write(data[offset:end])
                offset = end
        except Err as error:
            if isinstance(error.value, StreamError_Closed):
                raise ConnectionError(
                    "the response could not be sent: the client is gone"
                ) from None
            why = error.value.value.to_debug_string()
            raise ConnectionError(f"the response could not be sent: {why}") from None


def status_code(status: str) -> int:
    """The code of a WSGI status line (`"200 OK"`); the reason phrase is the HTTP library's."""
    code = status.split(" ", 1)[0] if isinstance(status, str) else ""
    if not (len(code) == 3 and code.isascii() and code.isdigit()):
        raise ValueError(f"the status {status!r} is not a WSGI status line such as '200 OK'")
    return int(code)


def header_list(headers: list) -> list:
    """The app's headers as wasi:http takes them: names lowercase, values latin-1 bytes."""
    taken = []
    for header in headers:
        if not (
            isinstance(header, tuple)
            and len(header) == 2
            and isinstance(header[0], str)
            and isinstance(header[1], str)
        ):
            raise TypeError(f"a WSGI header is a (str, str) tuple, not {header!r}")
        name = header[0].lower()
        if name not in DROPPED_HEADERS:
            taken.append((name, header[1].encode("latin-1")))
    return taken
