"""An HMAC-SHA256 tag for an object uploaded in parts, in any order, on any worker
(`wit/hmac-registry.wit` documents the construction).

    hmac_registry.begin(name, key_id)
    tapped, mac = hmac_registry.tap(name, number, ciphertext)     # a Stream, and its PartMac
    stored = objects.upload_part(key, upload_id, number, tapped, length)
    hmac_registry.add_part(name, mac, stored.etag)
    tag = hmac_registry.finish(name, objects.list_parts(key, upload_id))
"""

from typing import NamedTuple

from host_capabilities._base import HostCapabilityError, bindings, raising
from host_capabilities._streams import Stream, input_stream

_wit = bindings("hmac_registry")


class RegistryError(HostCapabilityError):
    """The registry's answer other than success."""


class UnknownEntry(RegistryError):
    """The app has no entry of this name."""

    def __init__(self):
        super().__init__("the app has no entry of this name")


class InvalidName(RegistryError):
    """A name must be 1 to 1024 bytes long."""

    def __init__(self):
        super().__init__("a name must be 1 to 1024 bytes long")


class EntryExists(RegistryError):
    """The entry exists under another key."""

    def __init__(self):
        super().__init__("the entry exists under another key")


class InvalidKey(RegistryError):
    """The key id was not issued to this app by this host, or it was altered."""

    def __init__(self):
        super().__init__("the key id was not issued to this app by this host, or was altered")


class InvalidPartNumber(RegistryError):
    """A part number must be between 1 and 10000."""

    def __init__(self):
        super().__init__("a part number must be between 1 and 10000")


class IncompletePart(RegistryError):
    """The part's stream was not read to its end."""

    def __init__(self):
        super().__init__("the part's stream was not read to its end")


class Finished(RegistryError):
    """The entry is finished: it takes no more parts."""

    def __init__(self):
        super().__init__("the entry is finished: it takes no more parts")


class Unfinished(RegistryError):
    """The entry is not finished: there is no tag yet."""

    def __init__(self):
        super().__init__("the entry is not finished: there is no tag yet")


class MissingParts(RegistryError):
    """These parts are missing (`parts`, their numbers)."""

    def __init__(self, parts: list):
        super().__init__(f"parts {parts} are missing")
        self.parts = list(parts)


class MismatchedParts(RegistryError):
    """These stored parts differ from the recorded ones (`parts`): send them again."""

    def __init__(self, parts: list):
        super().__init__(f"parts {parts} differ from the recorded ones")
        self.parts = list(parts)


class Tampered(RegistryError):
    """Verification failed: part `part`'s bytes are not the ones recorded."""

    def __init__(self, part: int):
        super().__init__(f"part {part} failed verification")
        self.part = part


class Unavailable(RegistryError):
    """The registry's database could not be reached or failed; nothing was changed."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_ERRORS = {
    _wit.RegistryError_UnknownEntry: lambda case: UnknownEntry(),
    _wit.RegistryError_InvalidName: lambda case: InvalidName(),
    _wit.RegistryError_EntryExists: lambda case: EntryExists(),
    _wit.RegistryError_InvalidKey: lambda case: InvalidKey(),
    _wit.RegistryError_InvalidPartNumber: lambda case: InvalidPartNumber(),
    _wit.RegistryError_IncompletePart: lambda case: IncompletePart(),
    _wit.RegistryError_Finished: lambda case: Finished(),
    _wit.RegistryError_Unfinished: lambda case: Unfinished(),
    _wit.RegistryError_MissingParts: lambda case: MissingParts(case.value),
    _wit.RegistryError_MismatchedParts: lambda case: MismatchedParts(case.value),
    _wit.RegistryError_Tampered: lambda case: Tampered(case.value),
    _wit.RegistryError_Unavailable: lambda case: Unavailable(case.value),
}


class Part(NamedTuple):
    """A recorded part: its number, size and the object store's etag of it."""

    number: int
    size: int
    etag: str


class PartMac:
    """The MAC of the bytes that went through a `tap`, complete once its stream has ended;
    `add_part` takes it (once)."""

    def __init__(self, mac):
        self._mac = mac

    @property
    def number(self) -> int:
        """The part number it was tapped for."""
        return self._live().number()

    @property
    def size(self) -> int:
        """The bytes it has seen so far."""
        return self._live().size()

    def _live(self):
        if self._mac is None:
            raise ValueError("the part's MAC was given to add_part already")
        return self._mac

    def _take(self):
        mac, self._mac = self._live(), None
        return mac


def begin(name: str, key_id: str) -> None:
    """Starts the entry `name` under the data key `key_id`; beginning it again under the same
    key does nothing."""
    with raising(_ERRORS):
        _wit.begin(name, key_id)


def tap(name: str, number: int, source) -> tuple:
    """A Stream passing `source` through unchanged while computing the MAC of part `number`
    inside the host, and that MAC: hand the stream on, then `add_part(name, mac, etag)`."""
    stream, length = input_stream(source, "handed on to hmac_registry.tap")
    with raising(_ERRORS):
        tapped, mac = _wit.tap(name, number, stream)
    return Stream(tapped, length), PartMac(mac)


def add_part(name: str, mac: PartMac, etag: str) -> Part:
    """Records a tapped part (replacing an earlier record of its number)."""
    with raising(_ERRORS):
        return _part(_wit.add_part(name, mac._take(), etag))


def add_part_bytes(name: str, number: int, data: bytes, etag: str) -> Part:
    """Records part `number` from its bytes (for small payloads)."""
    with raising(_ERRORS):
        return _part(_wit.add_part_bytes(name, number, bytes(data), etag))


def parts(name: str) -> list:
    """The recorded parts, by number."""
    with raising(_ERRORS):
        return [_part(part) for part in _wit.parts(name)]


def finish(name: str, stored) -> str:
    """Finishes the entry; its tag (64 hex digits). `stored` is what the object store holds,
    as `objects.list_parts` gives it (anything with `number`, `size` and `etag`)."""
    records = [_wit.Part(part.number, part.size, part.etag) for part in stored]
    with raising(_ERRORS):
        return _wit.finish(name, records)


def tag(name: str) -> str:
    """The tag of a finished entry."""
    with raising(_ERRORS):
        return _wit.tag(name)


def verify_stream(
    name: str, first: int, source, skip: int = 0, take: "int | None" = None
) -> Stream:
    """A Stream of the verified bytes of `source`, the entry's stored parts whole from part
    `first` on, each checked against its MAC before any of its bytes pass (the first before
    this returns: `Tampered` then); of them, `take` bytes from `skip` (all when None)."""
    stream, length = input_stream(source, "handed on to hmac_registry.verify_stream")
    if take is None:
        take = (1 << 64) - 1 if length is None else max(length - skip, 0)
    with raising(_ERRORS):
        verified = _wit.verify_stream(name, first, stream, skip, take)
    return Stream(verified, None if length is None else min(take, max(length - skip, 0)))


def discard(name: str) -> None:
    """Forgets the entry and its parts."""
    with raising(_ERRORS):
        _wit.discard(name)


def _part(part) -> Part:
    return Part(part.number, part.size, part.etag)
