"""`start_response`, the app's body written to the client as the app produces it, and
`wsgi.file_wrapper`, whose host streams are spliced to the client inside the host."""

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

# The most one splice moves inside the host (as the Rust guests' `web::CHUNK`).
SPLICE_CHUNK = 256 * 1024


class FileWrapper:
    """`environ["wsgi.file_wrapper"]` (PEP 3333). A file-like object that holds host streams
    (a `host_capabilities.Stream`, or anything with a `take_input_streams()` that yields
    wasi:io input-streams) is spliced into the response inside the host when the app returns
    the wrapper itself (in Flask: `Response(wrapper, direct_passthrough=True)`, as `send_file`
    does): none of its bytes enter Python. Any other file-like object, or a wrapper the app
    iterates itself, is read in `block_size` chunks."""

    def __init__(self, filelike, block_size: int = 64 * 1024):
        self.filelike = filelike
        self.block_size = block_size if block_size and block_size > 0 else 64 * 1024

    def __iter__(self):
        while chunk := self.filelike.read(self.block_size):
            yield chunk

    def close(self) -> None:
        close_if_closable(self.filelike)

    def input_streams(self):
        """The host streams to splice, in order, each handed over; None if there are none."""
        take = getattr(self.filelike, "take_input_streams", None)
        return None if take is None else take()


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
        # Bytes spliced into the body, and the Content-Length it declares.
        self._sent = 0
        self._declared = None

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

    def splice(self, sources) -> None:
        """Sends each wasi:io input-stream of `sources` in turn, spliced into the body inside
        the host, and drops it. A source that fails midway raises, so the response is cut,
        never short and looking whole."""
        self._send_head()
        if self._head_only:
            # Nothing is taken: the app's close() of the wrapper gives the streams back.
            return
        for source in sources:
            try:
                self._sent += self._splice_all(source)
            finally:
                source.__exit__(None, None, None)

    def _splice_all(self, source) -> int:
        sent = 0
        while True:
            try:
                sent += self._stream.blocking_splice(source, SPLICE_CHUNK)
            except Err as error:
                # Closed: the source ended (or the client's end closed, which the flush at the
                # finish tells apart).
                if isinstance(error.value, StreamError_Closed):
                    return sent
                # The source failed (a part that fails verification, storage gone): the
                # exception leaves the app, and the host cuts the response.
                why = error.value.value.to_debug_string()
                raise OSError(f"the response body failed midway: {why}") from None

    def finish(self) -> None:
        self._send_head()
        if self._sent:
            self._flush_spliced()
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
            if name == "content-length":
                if self._head_only:
                    continue
                self._declared = value
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

    def _flush_spliced(self) -> None:
        """A body of declared length is complete once that many bytes are out: the client's
        end may then close without waiting for the rest, and a closed stream is no failure."""
        try:
            self._stream.blocking_flush()
        except Err as error:
            complete = self._declared is not None and self._declared.strip() == b"%d" % self._sent
            if not (isinstance(error.value, StreamError_Closed) and complete):
                raise ConnectionError(
                    "the response could not be sent: the client is gone"
                ) from None

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


def close_if_closable(thing) -> None:
    """`thing.close()`, if it has one (PEP 3333 asks it of a response iterable and a file)."""
    close = getattr(thing, "close", None)
    if close is not None:
        close()


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
