"""AES-256-CTR with host-held keys (`wit/crypto.wit`): the guest holds key ids, never keys.
The counter starts at `iv + offset / 16`, so any part of a file is encrypted on its own.

    key_id = crypto.generate_key()
    ciphertext = crypto.encrypt_stream(key_id, iv, offset, request_body(environ))   # a Stream
"""

from host_capabilities._base import HostCapabilityError, bindings, raising
from host_capabilities._streams import Stream, input_stream

_wit = bindings("crypto")


class CryptoError(HostCapabilityError):
    """The crypto capability's answer other than success."""


class InvalidKey(CryptoError):
    """The key id was not issued to this app by this host, or it was altered."""

    def __init__(self):
        super().__init__("the key id was not issued to this app by this host, or was altered")


class InvalidIv(CryptoError):
    """The IV must be exactly 16 bytes."""

    def __init__(self):
        super().__init__("the IV must be exactly 16 bytes")


class OutOfRange(CryptoError):
    """The bytes would reach offset 2^64, past the keystream of one object."""

    def __init__(self):
        super().__init__("the bytes would reach offset 2^64, past the object's keystream")


_ERRORS = {
    _wit.CryptoError_InvalidKey: lambda case: InvalidKey(),
    _wit.CryptoError_InvalidIv: lambda case: InvalidIv(),
    _wit.CryptoError_OutOfRange: lambda case: OutOfRange(),
}


def generate_key() -> str:
    """A new AES-256 data key; its id."""
    return _wit.generate_key()


def encrypt(key_id: str, iv: bytes, offset: int, data: bytes) -> bytes:
    """`data`, the bytes at `offset` of the object, encrypted."""
    with raising(_ERRORS):
        return _wit.encrypt(key_id, bytes(iv), offset, bytes(data))


def decrypt(key_id: str, iv: bytes, offset: int, data: bytes) -> bytes:
    """`data`, the bytes at `offset` of the object, decrypted."""
    with raising(_ERRORS):
        return _wit.decrypt(key_id, bytes(iv), offset, bytes(data))


def encrypt_stream(key_id: str, iv: bytes, offset: int, source) -> Stream:
    """`source` (a Stream, or the request's environ or wsgi.input) encrypted as the bytes at
    `offset` of the object, inside the host as the result is read."""
    stream, length = input_stream(source, "handed on to crypto.encrypt_stream")
    with raising(_ERRORS):
        # The result holds as many bytes as its source.
        return Stream(_wit.encrypt_stream(key_id, bytes(iv), offset, stream), length)


def decrypt_stream(key_id: str, iv: bytes, offset: int, source) -> Stream:
    """`source` decrypted as the bytes at `offset` of the object, inside the host."""
    stream, length = input_stream(source, "handed on to crypto.decrypt_stream")
    with raising(_ERRORS):
        # The result holds as many bytes as its source.
        return Stream(_wit.decrypt_stream(key_id, bytes(iv), offset, stream), length)

