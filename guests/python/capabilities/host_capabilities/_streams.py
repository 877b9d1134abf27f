"""Streams of bytes the host holds (wasi:io input-streams) as Python file-like objects, and the
handing of one to a capability (or to the response) without its bytes entering Python."""

from componentize_py_types import Err
from wit_world.imports.streams import InputStream, StreamError_Closed

from host_capabilities._base import HostCapabilityError

# What one read asks the host for when the caller sets no size.
CHUNK = 64 * 1024


class StreamError(HostCapabilityError, OSError):
    """Reading a stream failed inside the host: the client went away, the storage failed, a
    part failed verification (`hmac_registry.verify_stream`); the text says why."""


class Stream:
    """A readable binary file over a wasi:io input-stream: `read(n=-1)`, `readinto(buffer)`,
    iteration in chunks of up to 64 KiB, `close()`, and `with`.

    Handed to a capability (`crypto.encrypt_stream(…, stream)`, `objects.upload_part`, …) or
    returned in `environ["wsgi.file_wrapper"](stream)`, the stream itself goes to the host,
    which reads it there: its bytes never enter Python. After that this object is spent (a
    read raises ValueError); what was read from it before is not sent again.

    `length` is the number of bytes the stream holds from its start, when known (a ranged
    `objects.get`, a request body with a Content-Length), else None.
    """

    def __init__(self, stream: InputStream, length: "int | None" = None):
        self._stream = stream
        self._spent = None  # why the stream can no longer be read, once it cannot
        self.length = length

    # -- file-like --------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._stream is None

    def read(self, size: "int | None" = -1) -> bytes:
        """Up to `size` bytes (all that is left when `size` is -1 or None); b"" at the end."""
        if size is None or size < 0:
            parts = []
            while chunk := self._read_some(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        parts, wanted = [], size
        while wanted > 0 and (chunk := self._read_some(wanted)):
            parts.append(chunk)
            wanted -= len(chunk)
        return b"".join(parts)

    def read1(self, size: int = -1) -> bytes:
        """What one read of the host gives, up to `size` bytes (64 KiB when -1)."""
        return self._read_some(CHUNK if size is None or size < 0 else size)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._read_some(len(view))
        view[: len(data)] = data
        return len(data)

    def __iter__(self):
        while chunk := self._read_some(CHUNK):
            yield chunk

    def close(self) -> None:
        """Gives the stream back to the host (its unread bytes are dropped)."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            self._spent = self._spent or "it is closed"
            stream.__exit__(None, None, None)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"spent: {self._spent}" if self._spent else f"length={self.length}"
        return f"<host_capabilities.Stream {state}>"

    # -- handing on -------------------------------------------------------------------------

    def take_input_streams(self):
        """The wasi:io input-streams this stream is made of, in order (one here), each handed
        over to the caller, who reads and drops it: what the bridge's `wsgi.file_wrapper`
        splices into the response."""
        yield self.take("sent as the response")

    def take(self, why: str = "handed on to a capability") -> InputStream:
        """The wasi:io input-stream itself, handed over to the caller; this object is spent."""
        if self._stream is None:
            raise ValueError(f"the stream cannot be handed on: {self._spent}")
        stream, self._stream = self._stream, None
        self._spent = f"it was {why}"
        return stream

    def _read_some(self, size: int) -> bytes:
        if self._stream is None:
            if self._spent and self._spent != "it reached its end":
                raise ValueError(f"the stream cannot be read: {self._spent}")
            return b""
        if size <= 0:
            return b""
        try:
            data = b""
            while not data:
                data = self._stream.blocking_read(size)
            return data
        except Err as error:
            if isinstance(error.value, StreamError_Closed):
                self.close()
                self._spent = "it reached its end"
                return b""
            why = error.value.value.to_debug_string()
            self.close()
            self._spent = f"reading it failed: {why}"
            raise StreamError(f"the stream could not be read: {why}") from None


class Chain(Stream):
    """Streams read one after the other as one, each made only when the one before has ended
    (so a download of many parts opens, checks and decrypts one part at a time). `parts` are
    Streams or functions that make one; an exception from one is raised where its bytes would
    be read (or, in a response, cuts it). `length` is their total, if known."""

    def __init__(self, parts, length: "int | None" = None):
        self._parts = iter(parts)
        self._current = None
        self._spent = None
        self.length = length

    @property
    def closed(self) -> bool:
        return self._parts is None

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        self._parts = None
        self._spent = self._spent or "it is closed"

    def take_input_streams(self):
        if self._parts is None:
            raise ValueError(f"the stream cannot be handed on: {self._spent}")
        parts, self._parts = self._parts, None
        self._spent = "it was sent as the response"
        if self._current is not None:
            current, self._current = self._current, None
            yield current.take("sent as the response")
        for part in parts:
            yield _made(part).take("sent as the response")

    def take(self, why: str = "handed on to a capability") -> InputStream:
        raise TypeError(
            "a Chain of streams is several wasi:io streams: read it, or return it in "
            "wsgi.file_wrapper, which sends each in turn"
        )

    def _read_some(self, size: int) -> bytes:
        while self._parts is not None:
            if self._current is None:
                part = next(self._parts, None)
                if part is None:
                    self._parts = None
                    self._spent = "it reached its end"
                    return b""
                self._current = _made(part)
            data = self._current._read_some(size)
            if data:
                return data
            self._current = None
        if self._spent and self._spent != "it reached its end":
            raise ValueError(f"the stream cannot be read: {self._spent}")
        return b""


def _made(part) -> Stream:
    return part() if callable(part) and not isinstance(part, Stream) else part


def request_body(source) -> Stream:
    """The request body as a Stream the capabilities can take whole: `source` is the WSGI
    environ (Flask's `request.environ`) or its `wsgi.input` (Flask's `request.stream` is that
    object, unless MAX_CONTENT_LENGTH makes Werkzeug wrap it: then pass the environ). The
    body must not have been read into a buffer (`readline`) before."""
    body = source.get("wsgi.input") if isinstance(source, dict) else source
    take = getattr(body, "take_input_stream", None)
    if take is None:
        raise TypeError(
            f"{type(body).__name__} is not the host's wsgi.input: pass the WSGI environ "
            "(Flask's request.environ), which holds it"
        )
    return take(Stream)


def input_stream(source, why: str) -> tuple:
    """The wasi:io input-stream of `source` (a Stream, the request's environ or wsgi.input, or
    a bare InputStream), handed over to a capability, and its length when known."""
    if isinstance(source, dict) or hasattr(source, "take_input_stream"):
        source = request_body(source)
    if isinstance(source, Stream):
        length = source.length
        return source.take(why), length
    if isinstance(source, InputStream):
        return source, None
    raise TypeError(
        f"{type(source).__name__} is not a stream the host can read: pass a "
        "host_capabilities.Stream or the request's environ / wsgi.input (for bytes in memory, "
        "use the *_bytes functions)"
    )
