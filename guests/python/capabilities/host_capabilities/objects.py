"""Object storage with S3's multipart uploads (`wit/objects.wit`): a local directory or any S3
API, as the host is configured. Keys are the app's own.

    upload_id = objects.create_multipart(key)
    info = objects.upload_part(key, upload_id, 1, stream, length)    # the stream stays in the host
    objects.complete_multipart(key, upload_id, objects.list_parts(key, upload_id))
    info, stream = objects.get(key, start, length)                    # a Stream of the bytes
"""

from typing import NamedTuple

from host_capabilities._base import HostCapabilityError, bindings, raising
from host_capabilities._streams import Stream, input_stream

_wit = bindings("objects")


class ObjectError(HostCapabilityError):
    """The object store's answer other than success."""


class _WithReason(ObjectError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class InvalidKey(_WithReason):
    """The key is not a valid key; `reason` says why."""


class NotFound(ObjectError):
    """No object has this key."""

    def __init__(self):
        super().__init__("no object has this key")


class NoSuchUpload(ObjectError):
    """No upload with this id is in progress for this key."""

    def __init__(self):
        super().__init__("no upload with this id is in progress for this key")


class InvalidPart(_WithReason):
    """A part breaks S3's rules; `reason` says which and how."""


class InvalidRange(ObjectError):
    """The range starts beyond the end of the object."""

    def __init__(self):
        super().__init__("the range starts beyond the end of the object")


class LengthMismatch(_WithReason):
    """The source stream ended before `length` bytes, or held more; nothing was stored."""


class SourceFailed(_WithReason):
    """Reading the source stream failed (the client went away, say); nothing was stored."""


class Unavailable(_WithReason):
    """The storage failed, after retries; nothing was changed."""


_ERRORS = {
    _wit.ObjectError_InvalidKey: lambda case: InvalidKey(case.value),
    _wit.ObjectError_NotFound: lambda case: NotFound(),
    _wit.ObjectError_NoSuchUpload: lambda case: NoSuchUpload(),
    _wit.ObjectError_InvalidPart: lambda case: InvalidPart(case.value),
    _wit.ObjectError_InvalidRange: lambda case: InvalidRange(),
    _wit.ObjectError_LengthMismatch: lambda case: LengthMismatch(case.value),
    _wit.ObjectError_SourceFailed: lambda case: SourceFailed(case.value),
    _wit.ObjectError_Unavailable: lambda case: Unavailable(case.value),
}


class PartInfo(NamedTuple):
    """A stored part: its number, size and the storage's tag of its bytes."""

    number: int
    size: int
    etag: str


class ObjectInfo(NamedTuple):
    """An object: its key, size, etag and when it was modified (seconds since the epoch)."""

    key: str
    size: int
    etag: str
    modified: int


def create_multipart(key: str) -> str:
    """Starts a multipart upload to `key`; its upload id."""
    with raising(_ERRORS):
        return _wit.create_multipart(key)


def upload_part(key: str, upload_id: str, number: int, source, length: int) -> PartInfo:
    """Stores part `number` from `source` (a Stream, or the request's environ or
    wsgi.input), which must hold exactly `length` bytes; they flow to the storage inside the
    host."""
    stream, _ = input_stream(source, "handed on to objects.upload_part")
    with raising(_ERRORS):
        return _part(_wit.upload_part(key, upload_id, number, stream, length))


def upload_part_bytes(key: str, upload_id: str, number: int, data: bytes) -> PartInfo:
    """Stores part `number` from bytes (for small payloads)."""
    with raising(_ERRORS):
        return _part(_wit.upload_part_bytes(key, upload_id, number, bytes(data)))


def list_parts(key: str, upload_id: str) -> list:
    """The parts stored so far, by number."""
    with raising(_ERRORS):
        return [_part(part) for part in _wit.list_parts(key, upload_id)]


def complete_multipart(key: str, upload_id: str, parts) -> ObjectInfo:
    """Joins `parts` (as `list_parts` gives them) into the object `key`."""
    records = [_wit.PartInfo(part.number, part.size, part.etag) for part in parts]
    with raising(_ERRORS):
        return _object(_wit.complete_multipart(key, upload_id, records))


def abort_multipart(key: str, upload_id: str) -> None:
    """Ends an upload and removes its parts."""
    with raising(_ERRORS):
        _wit.abort_multipart(key, upload_id)


def put(key: str, data: bytes) -> ObjectInfo:
    """Stores a whole object from bytes (for small payloads)."""
    with raising(_ERRORS):
        return _object(_wit.put(key, bytes(data)))


def get(key: str, start: int = 0, length: "int | None" = None) -> tuple:
    """The object's description and a Stream of its bytes from `start`, `length` of them or
    to the end."""
    with raising(_ERRORS):
        info, stream = _wit.get(key, start, length)
    info = _object(info)
    held = max(info.size - start, 0)
    return info, Stream(stream, held if length is None else min(length, held))


def head(key: str) -> "ObjectInfo | None":
    """The object's description, or None if there is none."""
    with raising(_ERRORS):
        info = _wit.head(key)
    return None if info is None else _object(info)


def delete(key: str) -> None:
    """Removes the object; removing a missing one is no error."""
    with raising(_ERRORS):
        _wit.delete(key)


def list_objects(prefix: str = "") -> list:
    """The app's objects whose keys start with `prefix`, by key."""
    with raising(_ERRORS):
        return [_object(info) for info in _wit.list_objects(prefix)]


def _part(part) -> PartInfo:
    return PartInfo(part.number, part.size, part.etag)


def _object(info) -> ObjectInfo:
    return ObjectInfo(info.key, info.size, info.etag, info.modified)
