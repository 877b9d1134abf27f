"""Lenzeye's upload service in Flask, on the host's capabilities through host_capabilities: the
API of DESIGN.md, as the Rust guest (guests/lenzeye) serves it, route for route, status for
status, on the same tables. File bytes never enter Python: each part's body streams from the
request through encryption and the HMAC registry into storage inside the host, and each
download back out through verification and decryption, spliced into the response by the WSGI
bridge's `wsgi.file_wrapper`.

All JSON; every route but `POST /users` takes `Authorization: Bearer <api_key>`:
`POST /users`, `POST /upload/initiate`, `PUT /upload/part`, `POST /upload/complete`,
`POST /upload/abort`, `GET /files`, `GET /files/{id}`, `DELETE /files/{id}`,
`GET /upload/ram-status`. Built by `guests/python/build` into guests/lenzeye-py.wasm.
"""

import hashlib
import json
import math
import os
import re
import secrets
import sys
import time

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.wsgi import wrap_file

from host_capabilities import Chain, crypto, hmac_registry, objects, request_body, sql, status

DEFAULT_PART_SIZE = 10 * 1024 * 1024
# S3's smallest part (but the last).
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000
MAX_FILENAME = 1024
# The most of an initiate body read.
MAX_INITIATE_BODY = 64 * 1024

app = Flask(__name__)


# -- answers ------------------------------------------------------------------------------------


class Refusal(Exception):
    """An answer other than success: its status, message and any more to say."""

    def __init__(self, status: int, message: str, **details):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **details}


@app.errorhandler(Refusal)
def refused(refusal: Refusal):
    return jsonify(refusal.body), refusal.status


# The one method each path takes, for a 405's message (the Rust guest's words).
ALLOWED = {
    "/users": "POST",
    "/upload/initiate": "POST",
    "/upload/complete": "POST",
    "/upload/abort": "POST",
    "/upload/part": "PUT",
    "/files": "GET",
    "/upload/ram-status": "GET",
}


def not_allowed(path: str) -> Refusal:
    if path not in ALLOWED:
        return Refusal(404, f"no route {path}")
    return Refusal(405, f"method not allowed here; use {ALLOWED[path]}")


@app.errorhandler(MethodNotAllowed)
def method_not_allowed(_error):
    return refused(not_allowed(request.path))


@app.errorhandler(NotFound)
def no_route(_error):
    return refused(Refusal(404, f"no route {request.path}"))


def route(path: str, methods: list):
    # No automatic OPTIONS answers: a method a route does not take is a 405, as in the Rust
    # guest.
    return app.route(path, methods=methods, provide_automatic_options=False)


# -- the database -------------------------------------------------------------------------------

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS users (
        id TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        created BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS files (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        upload_id TEXT NOT NULL UNIQUE,
        filename TEXT NOT NULL,
        content_type TEXT NOT NULL,
        size BIGINT NOT NULL,
        part_size BIGINT NOT NULL,
        parts BIGINT NOT NULL,
        status TEXT NOT NULL,
        object_key TEXT NOT NULL,
        store_upload_id TEXT NOT NULL,
        enc_key_id TEXT NOT NULL,
        mac_key_id TEXT NOT NULL,
        iv TEXT NOT NULL,
        hmac TEXT,
        created BIGINT NOT NULL,
        completed BIGINT
    )""",
    "CREATE INDEX IF NOT EXISTS files_by_user ON files (user_id, created)",
    # The IV each stored attempt of a part was encrypted with, by the store's etag of it.
    """CREATE TABLE IF NOT EXISTS part_ivs (
        file_id TEXT NOT NULL,
        number BIGINT NOT NULL,
        etag TEXT NOT NULL,
        iv TEXT NOT NULL,
        PRIMARY KEY (file_id, number, etag)
    )""",
]


def database_refusal(error: sql.SqlError) -> Refusal:
    """503 when the database cannot be reached (the client may retry), 500 when it refused
    the statement (a fault of this app)."""
    if isinstance(error, sql.Unavailable):
        return Refusal(503, f"the database is unavailable, try again: {error.reason}")
    if isinstance(error, sql.DatabaseError):
        print(f"the database refused a statement: {error.message}", file=sys.stderr)
        return Refusal(500, f"the database refused the request: {error.message}")
    return Refusal(500, f"the database failed: {error!r}")


def missing_table(error: sql.SqlError) -> bool:
    return isinstance(error, sql.DatabaseError) and (
        error.code == "42P01" or "no such table" in error.message
    )


def made_by_another(error: sql.SqlError) -> bool:
    """Whether making a table or index failed only because another request made it at the same
    time (PostgreSQL: a unique violation on its catalog, or the relation already there)."""
    return isinstance(error, sql.DatabaseError) and error.code in ("23505", "42P07", "42710")


def with_schema(run):
    """Runs `run`, making the tables first if they are missing."""
    try:
        return run()
    except sql.SqlError as error:
        if not missing_table(error):
            raise database_refusal(error) from None
    for statement in SCHEMA:
        # Another request may be making them at the same time: on PostgreSQL the slower one's
        # `IF NOT EXISTS` then fails once the faster one has committed, and the table is there.
        try:
            sql.execute(statement)
        except sql.SqlError as error:
            if not made_by_another(error):
                print(f"making the tables: {error!r}", file=sys.stderr)
    try:
        return run()
    except sql.SqlError as error:
        raise database_refusal(error) from None


def query(statement: str, params: list) -> sql.Rows:
    return with_schema(lambda: sql.query(statement, params))


def query_one(statement: str, params: list):
    rows = query(statement, params)
    return rows[0] if rows else None


def execute(statement: str, params: list) -> int:
    return with_schema(lambda: sql.execute(statement, params))


# -- users --------------------------------------------------------------------------------------


def random_hex(size: int) -> str:
    return secrets.token_hex(size)


def now() -> int:
    return int(time.time())


def key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@route("/users", ["POST"])
def create_user():
    user_id = random_hex(16)
    api_key = f"lz_{random_hex(32)}"
    execute(
        "INSERT INTO users (id, key_hash, created) VALUES ($1, $2, $3)",
        [user_id, key_hash(api_key), now()],
    )
    return jsonify({"user_id": user_id, "api_key": api_key}), 201


@app.before_request
def authenticate():
    """Every route but /users needs the key of a user, before its method or even its path is
    looked at (as in the Rust guest)."""
    if request.path == "/users":
        return
    header = request.headers.get("Authorization")
    if header is None:
        raise Refusal(401, "missing Authorization: Bearer <api_key>")
    api_key = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""
    if not api_key:
        raise Refusal(401, "the Authorization header must be Bearer <api_key>")
    row = query_one("SELECT id FROM users WHERE key_hash = $1", [key_hash(api_key)])
    if row is None:
        raise Refusal(401, "unknown API key")
    g.user_id = row["id"]
    # Flask answers HEAD with its GET route; the Rust guest takes HEAD nowhere.
    if request.method == "HEAD":
        raise not_allowed(request.path)


# -- files --------------------------------------------------------------------------------------

COLUMNS = (
    "id, filename, content_type, size, part_size, parts, status, object_key, "
    "store_upload_id, enc_key_id, iv, hmac, created"
)


class FileRecord:
    """A file, as its row says."""

    def __init__(self, row):
        self.id = row["id"]
        self.filename = row["filename"]
        self.content_type = row["content_type"]
        self.size = row["size"]
        self.part_size = row["part_size"]
        self.parts = row["parts"]
        self.ready = row["status"] == "ready"
        self.object_key = row["object_key"]
        self.store_upload_id = row["store_upload_id"]
        self.enc_key_id = row["enc_key_id"]
        self.iv = unhex(row["iv"]) or b""
        self.hmac = row["hmac"]
        self.created = row["created"]

    @staticmethod
    def load(user_id: str, file_id: str) -> "FileRecord":
        """The user's file of this id; another user's is not found."""
        row = query_one(
            f"SELECT {COLUMNS} FROM files WHERE id = $1 AND user_id = $2", [file_id, user_id]
        )
        if row is None:
            raise Refusal(404, f"no file {file_id}")
        return FileRecord(row)

    @staticmethod
    def by_upload(user_id: str) -> "FileRecord":
        """The user's upload named by the query's upload_id; another user's is not found."""
        upload_id = request.args.get("upload_id")
        if upload_id is None:
            raise Refusal(400, "upload_id is missing from the query")
        row = query_one(
            f"SELECT {COLUMNS} FROM files WHERE upload_id = $1 AND user_id = $2",
            [upload_id, user_id],
        )
        if row is None:
            raise Refusal(404, f"no upload {upload_id}")
        return FileRecord(row)

    def part_length(self, number: int) -> int:
        """The size of part `number`: the part size, but for the last."""
        if number < self.parts:
            return self.part_size
        return self.size - (self.parts - 1) * self.part_size

    def json(self) -> dict:
        return {
            "file_id": self.id,
            "filename": self.filename,
            "size": self.size,
            "content_type": self.content_type,
            "status": "ready" if self.ready else "uploading",
            "hmac": self.hmac,
            "created": self.created,
        }


def unhex(text) -> "bytes | None":
    if not isinstance(text, str) or not re.fullmatch(r"(?:[0-9a-fA-F]{2})*", text):
        return None
    return bytes.fromhex(text)


def part_size() -> int:
    """The part size of this deployment: LENZEYE_PART_SIZE (given to the host with
    `-e LENZEYE_PART_SIZE=…`), if at least 5 MiB, else 10 MiB."""
    size = os.environ.get("LENZEYE_PART_SIZE", "").strip()
    if size.isascii() and size.isdigit() and int(size) >= MIN_PART_SIZE:
        return int(size)
    return DEFAULT_PART_SIZE


def object_refusal(error: objects.ObjectError) -> Refusal:
    if isinstance(error, objects.Unavailable):
        return Refusal(503, f"the storage is unavailable, try again: {error.reason}")
    if isinstance(error, objects.LengthMismatch):
        return Refusal(400, f"the part's body is not its size: {error.reason}")
    if isinstance(error, objects.SourceFailed):
        return Refusal(400, f"the part's body could not be read: {error.reason}")
    if isinstance(error, objects.NoSuchUpload):
        return Refusal(404, "the storage no longer has this upload")
    if isinstance(error, objects.NotFound):
        return Refusal(404, "the stored file is missing")
    return Refusal(500, f"the storage refused: {error!r}")


def registry_refusal(error: hmac_registry.RegistryError) -> Refusal:
    if isinstance(error, hmac_registry.Unavailable):
        return Refusal(503, f"the HMAC registry is unavailable, try again: {error.reason}")
    if isinstance(error, hmac_registry.Finished):
        return Refusal(409, "the upload is complete: it takes no more parts")
    if isinstance(error, hmac_registry.MismatchedParts):
        return Refusal(
            409,
            "these parts changed or were not recorded; send them again",
            resend_parts=error.parts,
        )
    if isinstance(error, hmac_registry.MissingParts):
        return Refusal(409, "parts are missing", missing_parts=error.parts)
    if isinstance(error, hmac_registry.UnknownEntry):
        # The host discarded it: the upload was abandoned past --upload-expiry.
        return Refusal(404, "the registry no longer has this upload")
    return Refusal(500, f"the HMAC registry refused: {error!r}")


# -- uploads ------------------------------------------------------------------------------------


def reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


@route("/upload/initiate", ["POST"])
def initiate():
    """`{"filename", "size", "content_type"?}`: a multipart upload, a registry entry, two data
    keys (encryption, MAC) and a random IV."""
    data = request.stream.read(MAX_INITIATE_BODY + 1)
    try:
        if len(data) > MAX_INITIATE_BODY:
            raise ValueError("too large")
        body = json.loads(data, parse_constant=reject_constant)
    except (ValueError, RecursionError):
        raise Refusal(
            400, 'the body must be JSON: {"filename", "size", "content_type"?}'
        ) from None
    if not isinstance(body, dict):
        body = {}
    filename = body.get("filename")
    filename = filename.strip() if isinstance(filename, str) else ""
    if not filename or len(filename.encode()) > MAX_FILENAME:
        raise Refusal(
            400, f"filename must be a non-empty string of at most {MAX_FILENAME} bytes"
        )
    size = body.get("size")
    if not (type(size) is int and 1 <= size < 1 << 64):
        raise Refusal(400, "size must be a whole number of bytes, at least 1")
    content_type = body.get("content_type")
    if content_type is None:
        content_type = "application/octet-stream"
    elif not (isinstance(content_type, str) and 0 < len(content_type.encode()) <= 255):
        raise Refusal(400, "content_type must be a string of at most 255 bytes")
    chunk = part_size()
    parts = -(-size // chunk)
    if parts > MAX_PARTS:
        raise Refusal(400, f"{size} bytes is more than {MAX_PARTS} parts of {chunk} bytes")

    file_id = random_hex(16)
    upload_id = random_hex(16)
    object_key = f"files/{file_id}"
    enc_key_id = crypto.generate_key()
    mac_key_id = crypto.generate_key()
    iv = random_hex(16)
    try:
        store_upload_id = objects.create_multipart(object_key)
    except objects.ObjectError as error:
        raise object_refusal(error) from None
    # What is made before a failure is undone, so a failed initiate leaves nothing.
    try:
        try:
            hmac_registry.begin(file_id, mac_key_id)
        except hmac_registry.RegistryError as error:
            raise registry_refusal(error) from None
        execute(
            """INSERT INTO files (id, user_id, upload_id, filename, content_type, size,
                part_size, parts, status, object_key, store_upload_id, enc_key_id, mac_key_id,
                iv, created)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'uploading', $9, $10, $11, $12, $13, $14)""",
            [file_id, g.user_id, upload_id, filename, content_type, size, chunk, parts,
             object_key, store_upload_id, enc_key_id, mac_key_id, iv, now()],
        )
    except Refusal:
        undo_initiate(object_key, store_upload_id, file_id)
        raise
    return (
        jsonify({"upload_id": upload_id, "file_id": file_id, "part_size": chunk, "parts": parts}),
        201,
    )


def undo_initiate(object_key: str, store_upload_id: str, file_id: str) -> None:
    # Best effort: the refusal that brought us here is the answer.
    try:
        objects.abort_multipart(object_key, store_upload_id)
    except objects.ObjectError as error:
        print(f"undoing an initiate: {error!r}", file=sys.stderr)
    try:
        hmac_registry.discard(file_id)
    except hmac_registry.RegistryError as error:
        print(f"undoing an initiate: {error!r}", file=sys.stderr)


@route("/upload/part", ["PUT"])
def upload_part():
    """The body, part N's plaintext of exactly its size, streams through AES-256-CTR at its
    offset under a fresh IV, the registry's tap and into storage, all inside the host."""
    file = FileRecord.by_upload(g.user_id)
    if file.ready:
        raise Refusal(409, "the upload is complete: it takes no more parts")
    number = request.args.get("part_number", "")
    if not re.fullmatch(r"\+?[0-9]+", number) or not 1 <= int(number) <= file.parts:
        raise Refusal(400, f"part_number must be a whole number from 1 to {file.parts}")
    number = int(number)
    expected = file.part_length(number)
    length = request.content_length
    if length is None:
        raise Refusal(
            411, f"a part needs a Content-Length ({expected} bytes for part {number})"
        )
    if length != expected:
        raise Refusal(400, f"part {number} must be {expected} bytes, the body is {length}")
    plaintext = request_body(request.environ)
    offset = (number - 1) * file.part_size
    # Every attempt at a part gets an IV of its own (see the Rust guest's uploads.rs).
    iv = random_hex(16)
    try:
        ciphertext = crypto.encrypt_stream(file.enc_key_id, bytes.fromhex(iv), offset, plaintext)
    except crypto.CryptoError as error:
        raise Refusal(500, f"the file's key is unusable: {error!r}") from None
    try:
        tapped, mac = hmac_registry.tap(file.id, number, ciphertext)
    except hmac_registry.RegistryError as error:
        raise registry_refusal(error) from None
    try:
        stored = objects.upload_part(
            file.object_key, file.store_upload_id, number, tapped, expected
        )
    except objects.ObjectError as error:
        raise object_refusal(error) from None
    # Recorded before the registry takes the part, so every part it takes has its IV.
    execute(
        """INSERT INTO part_ivs (file_id, number, etag, iv) VALUES ($1, $2, $3, $4)
           ON CONFLICT (file_id, number, etag) DO NOTHING""",
        [file.id, number, stored.etag, iv],
    )
    try:
        hmac_registry.add_part(file.id, mac, stored.etag)
    except hmac_registry.RegistryError as error:
        raise registry_refusal(error) from None
    return jsonify({"part_number": number, "size": expected})


@route("/upload/complete", ["POST"])
def complete():
    file = FileRecord.by_upload(g.user_id)

    def done(hmac: str):
        return jsonify({"file_id": file.id, "size": file.size, "hmac": hmac})

    if file.ready and file.hmac is not None:
        return done(file.hmac)
    try:
        stored = objects.list_parts(file.object_key, file.store_upload_id)
    except objects.NoSuchUpload:
        # Completed in the storage by an earlier try that could not mark the file ready.
        return done(recover_completed(file))
    except objects.ObjectError as error:
        raise object_refusal(error) from None
    numbers = {part.number for part in stored}
    missing = [number for number in range(1, file.parts + 1) if number not in numbers]
    if missing:
        raise Refusal(
            409, f"{len(missing)} of {file.parts} parts are missing", missing_parts=missing
        )
    wrong = [part.number for part in stored if part.size != file.part_length(part.number)]
    if wrong:
        raise Refusal(
            409, "these parts have the wrong size; send them again", resend_parts=wrong
        )
    try:
        hmac = hmac_registry.finish(file.id, stored)
    except hmac_registry.RegistryError as error:
        raise registry_refusal(error) from None
    try:
        objects.complete_multipart(file.object_key, file.store_upload_id, stored)
    except objects.ObjectError as error:
        raise object_refusal(error) from None
    mark_ready(file, hmac)
    return done(hmac)


def recover_completed(file: FileRecord) -> str:
    """The storage has the whole object and the registry its tag: only the row was not
    updated."""
    try:
        stored = objects.head(file.object_key)
    except objects.ObjectError as error:
        raise object_refusal(error) from None
    # Checked first: an upload aborted in the storage (past --upload-expiry, say) has an
    # unfinished registry entry, or none, and is told as gone, not as a registry failure.
    if stored is None or stored.size != file.size:
        raise Refusal(409, "the upload is gone from the storage; start it again")
    try:
        hmac = hmac_registry.tag(file.id)
    except hmac_registry.RegistryError as error:
        raise registry_refusal(error) from None
    mark_ready(file, hmac)
    return hmac


def mark_ready(file: FileRecord, hmac: str) -> None:
    execute(
        "UPDATE files SET status = 'ready', hmac = $1, completed = $2 WHERE id = $3",
        [hmac, now(), file.id],
    )


@route("/upload/abort", ["POST"])
def abort():
    """Nothing of the upload is left."""
    file = FileRecord.by_upload(g.user_id)
    if file.ready:
        raise Refusal(
            409, f"the upload is complete; DELETE /files/{file.id} removes the file"
        )
    remove(file)
    return "", 204


def remove(file: FileRecord) -> None:
    """Removes everything of a file: its stored bytes or upload, its registry entry, its
    row."""
    try:
        if file.ready:
            objects.delete(file.object_key)
        else:
            try:
                objects.abort_multipart(file.object_key, file.store_upload_id)
            except objects.NoSuchUpload:
                pass
    except objects.ObjectError as error:
        raise object_refusal(error) from None
    try:
        hmac_registry.discard(file.id)
    except hmac_registry.RegistryError as error:
        raise registry_refusal(error) from None
    execute("DELETE FROM part_ivs WHERE file_id = $1", [file.id])
    execute("DELETE FROM files WHERE id = $1", [file.id])


# -- the user's files ---------------------------------------------------------------------------


@route("/files", ["GET"])
def list_files():
    rows = query(
        f"SELECT {COLUMNS} FROM files WHERE user_id = $1 ORDER BY created, id", [g.user_id]
    )
    return jsonify({"files": [FileRecord(row).json() for row in rows]})


# Every method, so that one other than GET and DELETE is a 404, as in the Rust guest.
@route("/files/<path:file_id>", ["GET", "DELETE", "POST", "PUT", "PATCH", "OPTIONS"])
def file_route(file_id: str):
    if request.method == "GET":
        return download(file_id)
    if request.method == "DELETE":
        remove(FileRecord.load(g.user_id, file_id))
        return "", 204
    raise Refusal(404, f"no route {request.path}")


class Unsatisfiable(Exception):
    """A range that starts beyond the file."""


def position(text: str) -> "int | None":
    """A `1*DIGIT` position, None for anything else (a sign, a space, nothing)."""
    return int(text) if text and text.isascii() and text.isdigit() else None


def byte_range(header: "str | None", size: int) -> "tuple | None":
    """The first and last byte of a `Range: bytes=a-b` (or `a-`, `-n`), None for the whole
    file (no header, or one that is not a single byte range, which is ignored)."""
    if header is None:
        return None
    unit, equals, spec = header.strip(" \t").partition("=")
    # Range units are case-insensitive; no whitespace is allowed around `=` or `-`.
    if not equals or unit.lower() != "bytes":
        return None
    first_text, dash, last_text = spec.partition("-")
    if not dash:
        return None
    first, last = position(first_text), position(last_text)
    if first is not None and last is not None and first <= last:
        if first >= size:
            raise Unsatisfiable()
        return first, min(last, size - 1)
    if first is not None and last is None and not last_text:
        if first >= size:
            raise Unsatisfiable()
        return first, size - 1
    if first is None and last is not None and not first_text:
        if last == 0 or size == 0:
            raise Unsatisfiable()
        return size - min(last, size), size - 1
    return None


def download(file_id: str):
    """200 with the whole file, or 206 with a range; each part read whole, checked against its
    MAC, and decrypted under the IV its stored attempt was encrypted with, inside the host;
    the bridge splices them into the response one after the other."""
    file = FileRecord.load(g.user_id, file_id)
    if not file.ready:
        raise Refusal(409, "the upload of this file is not complete")
    try:
        wanted = byte_range(request.headers.get("Range"), file.size)
    except Unsatisfiable:
        raise Refusal(
            416, f"the range is outside the file's {file.size} bytes", size=file.size
        ) from None
    status, (start, end) = (200, (0, file.size - 1)) if wanted is None else (206, wanted)
    first = start // file.part_size + 1
    last = end // file.part_size + 1
    ivs = part_ivs(file)
    # The first part is checked before the answer begins: a bad one is an error answer.
    first_part = part_plaintext(file, ivs, first, start, end)

    def later(number: int):
        def make():
            try:
                return part_plaintext(file, ivs, number, start, end)
            except Refusal as refusal:
                # The answer has begun: the body is cut (the exception leaves the app).
                print(
                    f"the download of file {file.id} was cut: part {number}: {refusal.body}",
                    file=sys.stderr,
                )
                raise

        return make

    take = end - start + 1
    body = Chain([first_part] + [later(number) for number in range(first + 1, last + 1)], take)
    headers = {
        "Content-Length": str(take),
        "Accept-Ranges": "bytes",
        "ETag": f'"{file.hmac or ""}"',
        "Content-Disposition": f'attachment; filename="{quoted(file.filename)}"',
    }
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end}/{file.size}"
    return Response(
        wrap_file(request.environ, body),
        status=status,
        headers=headers,
        content_type=file.content_type,
        direct_passthrough=True,
    )


def part_ivs(file: FileRecord) -> dict:
    """The IV of each part the registry holds, by number: the one its stored attempt was
    encrypted with (recorded by the store's etag), or the file's own for parts stored before
    parts had IVs."""
    try:
        recorded = hmac_registry.parts(file.id)
    except hmac_registry.RegistryError as error:
        raise registry_refusal(error) from None
    rows = query("SELECT number, etag, iv FROM part_ivs WHERE file_id = $1", [file.id])
    by_attempt = {(row["number"], row["etag"]): unhex(row["iv"]) for row in rows}
    return {
        part.number: by_attempt.get((part.number, part.etag)) or file.iv for part in recorded
    }


def part_plaintext(file: FileRecord, ivs: dict, number: int, start: int, end: int):
    """The plaintext of bytes `start..=end` of the file that lie in part `number`, as a
    Stream: the stored part read whole, verified and decrypted inside the host."""
    part_start = (number - 1) * file.part_size
    part_end = min(number * file.part_size, file.size)
    begin = max(start, part_start)
    stop = min(end + 1, part_end)
    iv = ivs.get(number)
    if iv is None:
        raise Refusal(500, f"the registry has no part {number}")
    try:
        _, source = objects.get(file.object_key, part_start, part_end - part_start)
    except objects.ObjectError as error:
        raise object_refusal(error) from None
    try:
        verified = hmac_registry.verify_stream(
            file.id, number, source, begin - part_start, stop - begin
        )
    except hmac_registry.Tampered as error:
        print(
            f"file {file.id} failed verification at part {error.part}: not served",
            file=sys.stderr,
        )
        raise Refusal(
            500,
            f"the stored file failed verification (part {error.part}); it is not served",
        ) from None
    except hmac_registry.RegistryError as error:
        raise registry_refusal(error) from None
    try:
        return crypto.decrypt_stream(file.enc_key_id, iv, begin, verified)
    except crypto.CryptoError as error:
        raise Refusal(500, f"the file's key is unusable: {error!r}") from None


def quoted(name: str) -> str:
    """A file name fit for a quoted header parameter."""
    return "".join(
        "_" if c in '"\\' or not c.isascii() or not c.isprintable() else c for c in name
    )


# -- memory -------------------------------------------------------------------------------------


def mb(size: int) -> float:
    # Halves away from zero, as the Rust guest's f64::round.
    return math.floor(size / 1048576 * 10 + 0.5) / 10


@route("/upload/ram-status", ["GET"])
def ram_status():
    """The seed's figures, from the host's, plus this instance's own memory."""
    figures = status.memory()
    return jsonify(
        {
            "ram_used_mb": mb(figures.host_resident),
            "ram_limit_mb": mb(figures.host_limit),
            "ram_free_mb": mb(max(figures.host_limit - figures.host_resident, 0)),
            "ram_budget_mb": None if figures.host_budget is None else mb(figures.host_budget),
            "worker_ram_used_mb": mb(figures.worker_resident),
            "instance_memory_mb": mb(figures.instance_used),
            "instance_memory_limit_mb": mb(figures.instance_limit),
        }
    )
