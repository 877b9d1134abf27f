"""The host's capabilities (the WIT in `wit/`) for Python guests, over componentize-py's
bindings, one module a capability:

    from host_capabilities import sql, crypto, hmac_registry, objects, status

- `sql.query("SELECT id, name FROM t WHERE id = $1", [id])` returns `Rows`, a list of `Row`s
  (by index, by column name `row["name"]`, or as attributes `row.name`) with `.columns`;
  `sql.query_one(...)` the first row or None; `sql.execute(...)` the number of rows changed;
  `with sql.transaction() as tx:` commits when the block ends, rolls back when it raises.
  Parameters and values are None, int, float, str, bytes and bool.
- `crypto`, `hmac_registry`, `objects`, `status`: the WIT functions with snake_case names;
  records come back as named tuples (`objects.PartInfo(number, size, etag)`, …).
- Errors: every WIT error case is an exception, a subclass of one class per capability
  (`sql.SqlError`, `crypto.CryptoError`, `hmac_registry.RegistryError`,
  `objects.ObjectError`), all of them `HostCapabilityError`s, carrying the case's fields:
  `sql.DatabaseError(code, message, constraint)`, `objects.NotFound()`,
  `hmac_registry.MissingParts(parts)`, `objects.Unavailable(reason)`, …

Streams: the functions that take or give bytes in bulk take and give `Stream`s, readable
binary files over a wasi:io input-stream held by the host (`read(n=-1)`, `readinto`, iteration
in chunks, `close`). Handed to another capability, a stream goes to the host as it is and is
read there, so the bytes never enter Python: a part can go request body →
`crypto.encrypt_stream` → `hmac_registry.tap` → `objects.upload_part` all inside the host.

- The request body: `request_body(environ)` is the body as a `Stream`; a capability also takes
  the environ, or `environ["wsgi.input"]`, where it takes a stream. In Flask,
  `request.environ`, or `request.stream`, which is the bridge's `wsgi.input` itself (the
  bridge sets `wsgi.input_terminated`) unless `MAX_CONTENT_LENGTH` makes Werkzeug wrap it:
  then pass `request.environ` (and check the length yourself). Take it before reading any of
  the body.
- Responses: return `environ["wsgi.file_wrapper"](stream)` (PEP 3333; in Flask
  `werkzeug.wsgi.wrap_file(request.environ, stream)` in a `Response(...,
  direct_passthrough=True)`, or `send_file(stream, …)`), and the bridge splices the stream
  into the response inside the host. `Chain(parts)` is several streams sent one after the
  other, each made only when the one before has been sent. Any other file-like object in
  `wsgi.file_wrapper` is read in chunks through Python.

The host answers only while a request is served: a capability called while the component is
built (as the app is imported, or warmed up: `guests/python/build --warm-up`) raises
`CalledWhileBuilding`.

A capability's module can be imported only if the component imports the capability:
`guests/python/build --capabilities sql,objects` builds one that imports those two (the
default is all of them, which the host grants an app unless told otherwise), and importing
`host_capabilities.crypto` in it fails the build with an error naming the option.
"""

from host_capabilities._base import CalledWhileBuilding, HostCapabilityError
from host_capabilities._streams import Chain, Stream, StreamError, request_body

__all__ = [
    "CalledWhileBuilding",
    "Chain",
    "HostCapabilityError",
    "Stream",
    "StreamError",
    "request_body",
]
