"""Lenzeye as the seed runs it, for tests/bench/lenzeye to measure the host against: a Flask app
under gunicorn (gthread) with Flask-SQLAlchemy (SQLite by default, PostgreSQL through psycopg),
each part encrypted with `cryptography`'s AES-256-CTR under a BoundedSemaphore(4), an HMAC-SHA256
over the file kept in an in-process registry (the reason the seed runs one worker), and the
parts stored in local files or through boto3's S3 multipart upload. Only the upload service's
routes are here, with the HTTP API of the host's Lenzeye guest (the project's DESIGN.md), so one
client drives both:

    POST /users, POST /upload/initiate, PUT /upload/part, POST /upload/complete,
    POST /upload/abort, GET /files, GET /files/{id} (Range), DELETE /files/{id},
    GET /upload/ram-status

Configured by the environment, as the seed's app is:

    LENZEYE_DATA_DIR       SQLite file, local objects, master key (required)
    LENZEYE_DATABASE_URL   an SQLAlchemy URL; default sqlite:///<data dir>/lenzeye.db
    LENZEYE_STORAGE        `local` (default, under the data dir) or `s3://BUCKET[/PREFIX]`
    LENZEYE_S3_ENDPOINT    the S3 API's URL (AWS_* variables give the credentials)
    LENZEYE_PART_SIZE      bytes a part, default 10485760

What the seed says and this follows: the semaphore spans encryption and the store's write of
the part (`with _encrypt_semaphore: encrypted_chunk = encrypt_multipart_chunk(...);
s3.upload_part(..., Body=io.BytesIO(encrypted_chunk))`); the part's plaintext is read whole
before it; the counter of a part starts at `iv + byte_offset / 16`; boto3 has the seed's
settings (s3v4, 50 connections, adaptive retries, 10 s connect and 60 s read timeouts), and
path-style addressing, which an S3 API server on a loopback address needs; the engine has the
seed's pool options. The HMAC is computed over the ciphertext as each part arrives, one tag a
part (so parts may come in any order and each can be checked on its own when it is read back),
and the file's tag is the HMAC of the part tags in order; the part tags are held in the
worker's memory until the upload completes, then kept in the file's row.

Durability is the host's: local parts are written with fdatasync, as the host's local store
does, each part before it is taken and the whole object when an upload completes (the parts are
then joined into one file and removed, as the host's local store joins them); a local part's
etag is a random token, as the host's local store names a part, not an MD5 of its bytes; SQLite
runs in write-ahead-log mode with synchronous=FULL (SQLite's default) and waits up to 30 s for a
writer's lock, as the host's SQLite does.

Served as the seed serves it, but for the tables and the master key, which are made once before
the workers start (the seed's Flask-Migrate step), since workers booting at once would race to
make them:

    python flask_lenzeye.py migrate
    gunicorn 'flask_lenzeye:create_app()' --worker-class=gthread --threads=6 ...
"""

import hashlib
import hmac
import io
import json
import os
import secrets
import shutil
import sys
import threading
import time

import boto3
from botocore.config import Config
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flask import Flask, Response, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import text
from werkzeug.exceptions import HTTPException

DEFAULT_PART_SIZE = 10 * 1024 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000
MAX_FILENAME = 1024

# At 10 MB a part: 4 x 10 MB of encryption buffers at most (the seed's memory budget).
_encrypt_semaphore = threading.BoundedSemaphore(4)

# upload_id -> {part_number: (tag, etag)}: the in-process HMAC registry. A second worker would
# not see the parts this one took, which is why the seed runs --workers=1.
_hmac_registry = {}
_registry_lock = threading.Lock()

db = SQLAlchemy()


class User(db.Model):
    __tablename__ = "users"
    id = db.Column(db.String(32), primary_key=True)
    key_hash = db.Column(db.String(64), nullable=False, unique=True)
    created = db.Column(db.BigInteger, nullable=False)


class File(db.Model):
    __tablename__ = "files"
    id = db.Column(db.String(32), primary_key=True)
    user_id = db.Column(db.String(32), nullable=False, index=True)
    upload_id = db.Column(db.String(32), nullable=False, unique=True)
    filename = db.Column(db.Text, nullable=False)
    content_type = db.Column(db.Text, nullable=False)
    size = db.Column(db.BigInteger, nullable=False)
    part_size = db.Column(db.BigInteger, nullable=False)
    parts = db.Column(db.BigInteger, nullable=False)
    status = db.Column(db.String(16), nullable=False)
    object_key = db.Column(db.Text, nullable=False)
    store_upload_id = db.Column(db.Text, nullable=False)
    # The file's AES and HMAC keys, each wrapped under the master key (AES-GCM).
    enc_key = db.Column(db.Text, nullable=False)
    mac_key = db.Column(db.Text, nullable=False)
    iv = db.Column(db.String(32), nullable=False)
    part_tags = db.Column(db.Text)
    hmac = db.Column(db.String(64))
    created = db.Column(db.BigInteger, nullable=False)
    completed = db.Column(db.BigInteger)

    def part_length(self, number):
        if number < self.parts:
            return self.part_size
        return self.size - (self.parts - 1) * self.part_size

    def json(self):
        return {
            "file_id": self.id,
            "filename": self.filename,
            "size": self.size,
            "content_type": self.content_type,
            "status": self.status,
            "hmac": self.hmac,
            "created": self.created,
        }


class Refusal(Exception):
    def __init__(self, status, message, **details):
        super().__init__(message)
        self.status, self.body = status, {"error": message, **details}


def encrypt_multipart_chunk(plaintext_chunk, key, iv, byte_offset):
    """AES-256-CTR with the counter at `iv + byte_offset / 16`: any part on its own."""
    counter = (int.from_bytes(iv, "big") + byte_offset // 16) % (1 << 128)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
    return encryptor.update(plaintext_chunk) + encryptor.finalize()


# CTR decrypts as it encrypts.
decrypt_multipart_chunk = encrypt_multipart_chunk


class LocalStore:
    """Parts as files under <data dir>/uploads/<upload>, joined into <data dir>/objects/<key>."""

    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, "uploads"), mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(root, "objects"), mode=0o700, exist_ok=True)

    def _upload_dir(self, upload_id):
        return os.path.join(self.root, "uploads", upload_id)

    def _object_path(self, key):
        return os.path.join(self.root, "objects", key.replace("/", "_"))

    @staticmethod
    def _write(path, chunks):
        temporary = f"{path}.{secrets.token_hex(8)}.tmp"
        with open(temporary, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fdatasync(out.fileno())
        os.replace(temporary, path)

    def create_multipart(self, key):
        upload_id = secrets.token_hex(16)
        os.makedirs(self._upload_dir(upload_id), mode=0o700)
        return upload_id

    def upload_part(self, key, upload_id, number, data):
        self._write(os.path.join(self._upload_dir(upload_id), f"{number:05}.part"), [data])
        return secrets.token_hex(8)

    def complete_multipart(self, key, upload_id, parts):
        directory = self._upload_dir(upload_id)

        def chunks():
            for number, _etag in parts:
                with open(os.path.join(directory, f"{number:05}.part"), "rb") as part:
                    while chunk := part.read(1 << 20):
                        yield chunk

        self._write(self._object_path(key), chunks())
        shutil.rmtree(directory)

    def abort_multipart(self, key, upload_id):
        shutil.rmtree(self._upload_dir(upload_id), ignore_errors=True)

    def get(self, key, start, length):
        with open(self._object_path(key), "rb") as stored:
            stored.seek(start)
            return stored.read(length)

    def delete(self, key):
        try:
            os.unlink(self._object_path(key))
        except FileNotFoundError:
            pass


class S3Store:
    """boto3's multipart upload, with the seed's client settings."""

    def __init__(self, location, endpoint):
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=os.environ.get("AWS_REGION", "us-east-1"),
            config=Config(
                signature_version="s3v4",
                max_pool_connections=50,
                retries={"max_attempts": 3, "mode": "adaptive"},
                connect_timeout=10,
                read_timeout=60,
                s3={"addressing_style": "path"},
            ),
        )

    def _key(self, key):
        return f"{self.prefix}/{key}" if self.prefix else key

    def create_multipart(self, key):
        return self.s3.create_multipart_upload(Bucket=self.bucket, Key=self._key(key))["UploadId"]

    def upload_part(self, key, upload_id, number, data):
        answer = self.s3.upload_part(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id,
                                     PartNumber=number, Body=io.BytesIO(data))
        return answer["ETag"]

    def complete_multipart(self, key, upload_id, parts):
        self.s3.complete_multipart_upload(
            Bucket=self.bucket, Key=self._key(key), UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in parts]})

    def abort_multipart(self, key, upload_id):
        self.s3.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id)

    def get(self, key, start, length):
        answer = self.s3.get_object(Bucket=self.bucket, Key=self._key(key),
                                    Range=f"bytes={start}-{start + length - 1}")
        return answer["Body"].read()

    def delete(self, key):
        self.s3.delete_object(Bucket=self.bucket, Key=self._key(key))


def master_key_path(data_dir):
    return os.path.join(data_dir, "master.key")


def database_url(data_dir):
    return os.environ.get("LENZEYE_DATABASE_URL") or f"sqlite:///{data_dir}/lenzeye.db"


def create_app():
    data_dir = os.environ["LENZEYE_DATA_DIR"]
    url = database_url(data_dir)
    storage = os.environ.get("LENZEYE_STORAGE", "local")
    part_size = int(os.environ.get("LENZEYE_PART_SIZE", DEFAULT_PART_SIZE))
    if part_size < MIN_PART_SIZE:
        part_size = DEFAULT_PART_SIZE

    app = Flask(__name__)
    engine_options = {"pool_pre_ping": True, "pool_recycle": 180, "pool_timeout": 30}
    if url.startswith("postgresql"):
        engine_options["connect_args"] = {"connect_timeout": 10}
    else:
        engine_options["connect_args"] = {"timeout": 30}
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options
    db.init_app(app)

    if storage.startswith("s3://"):
        store = S3Store(storage, os.environ.get("LENZEYE_S3_ENDPOINT"))
    else:
        store = LocalStore(data_dir)
    with open(master_key_path(data_dir), "rb") as stored:
        wrapper = AESGCM(stored.read())

    def wrap(key):
        nonce = secrets.token_bytes(12)
        return (nonce + wrapper.encrypt(nonce, key, None)).hex()

    def unwrap(wrapped):
        raw = bytes.fromhex(wrapped)
        return wrapper.decrypt(raw[:12], raw[12:], None)

    def now():
        return int(time.time())

    def authenticate():
        header = request.headers.get("Authorization", "")
        if not header:
            raise Refusal(401, "missing Authorization: Bearer <api_key>")
        api_key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not api_key:
            raise Refusal(401, "the Authorization header must be Bearer <api_key>")
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        user = db.session.execute(db.select(User).filter_by(key_hash=digest)).scalar_one_or_none()
        if user is None:
            raise Refusal(401, "unknown API key")
        return user

    def file_by_upload(user):
        upload_id = request.args.get("upload_id")
        if not upload_id:
            raise Refusal(400, "upload_id is missing from the query")
        found = db.session.execute(
            db.select(File).filter_by(upload_id=upload_id, user_id=user.id)).scalar_one_or_none()
        if found is None:
            raise Refusal(404, f"no upload {upload_id}")
        return found

    def file_by_id(user, file_id):
        found = db.session.execute(
            db.select(File).filter_by(id=file_id, user_id=user.id)).scalar_one_or_none()
        if found is None:
            raise Refusal(404, f"no file {file_id}")
        return found

    @app.errorhandler(Refusal)
    def refused(refusal):
        return jsonify(refusal.body), refusal.status

    @app.errorhandler(HTTPException)
    def http_error(error):
        return jsonify({"error": error.description}), error.code

    @app.post("/users")
    def create_user():
        api_key = f"lz_{secrets.token_hex(32)}"
        user = User(id=secrets.token_hex(16), key_hash=hashlib.sha256(api_key.encode()).hexdigest(),
                    created=now())
        db.session.add(user)
        db.session.commit()
        return jsonify({"user_id": user.id, "api_key": api_key}), 201

    @app.post("/upload/initiate")
    def initiate():
        user = authenticate()
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise Refusal(400, 'the body must be JSON: {"filename", "size", "content_type"?}')
        filename = body.get("filename")
        if not isinstance(filename, str) or not filename.strip() or len(filename.strip()) > MAX_FILENAME:
            raise Refusal(400, f"filename must be a non-empty string of at most {MAX_FILENAME} bytes")
        size = body.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise Refusal(400, "size must be a whole number of bytes, at least 1")
        content_type = body.get("content_type") or "application/octet-stream"
        if not isinstance(content_type, str) or len(content_type) > 255:
            raise Refusal(400, "content_type must be a string of at most 255 bytes")
        parts = -(-size // part_size)
        if parts > MAX_PARTS:
            raise Refusal(400, f"{size} bytes is more than {MAX_PARTS} parts of {part_size} bytes")
        file_id = secrets.token_hex(16)
        upload_id = secrets.token_hex(16)
        object_key = f"files/{file_id}"
        store_upload_id = store.create_multipart(object_key)
        record = File(id=file_id, user_id=user.id, upload_id=upload_id, filename=filename.strip(),
                      content_type=content_type, size=size, part_size=part_size, parts=parts,
                      status="uploading", object_key=object_key, store_upload_id=store_upload_id,
                      enc_key=wrap(secrets.token_bytes(32)), mac_key=wrap(secrets.token_bytes(32)),
                      iv=secrets.token_hex(16), created=now())
        try:
            db.session.add(record)
            db.session.commit()
        except Exception:
            store.abort_multipart(object_key, store_upload_id)
            raise
        with _registry_lock:
            _hmac_registry[upload_id] = {}
        return jsonify({"upload_id": upload_id, "file_id": file_id, "part_size": part_size,
                        "parts": parts}), 201

    @app.put("/upload/part")
    def upload_part():
        user = authenticate()
        record = file_by_upload(user)
        if record.status == "ready":
            raise Refusal(409, "the upload is complete: it takes no more parts")
        try:
            number = int(request.args.get("part_number", ""))
        except ValueError:
            number = 0
        if not 1 <= number <= record.parts:
            raise Refusal(400, f"part_number must be a whole number from 1 to {record.parts}")
        expected = record.part_length(number)
        if request.content_length is None:
            raise Refusal(411, f"a part needs a Content-Length ({expected} bytes for part {number})")
        if request.content_length != expected:
            raise Refusal(400, f"part {number} must be {expected} bytes, the body is {request.content_length}")
        plaintext_chunk = request.get_data(cache=False)
        if len(plaintext_chunk) != expected:
            raise Refusal(400, f"part {number} must be {expected} bytes, the body is {len(plaintext_chunk)}")
        key, mac_key, iv = unwrap(record.enc_key), unwrap(record.mac_key), bytes.fromhex(record.iv)
        byte_offset = (number - 1) * record.part_size
        # The file's row is not needed while the part is encrypted and stored.
        object_key, store_upload_id, upload_id = record.object_key, record.store_upload_id, record.upload_id
        db.session.rollback()
        with _encrypt_semaphore:
            encrypted_chunk = encrypt_multipart_chunk(plaintext_chunk, key, iv, byte_offset)
            del plaintext_chunk
            tag = hmac.new(mac_key, encrypted_chunk, hashlib.sha256).digest()
            etag = store.upload_part(object_key, store_upload_id, number, encrypted_chunk)
            del encrypted_chunk
        with _registry_lock:
            registry = _hmac_registry.get(upload_id)
            if registry is None:
                raise Refusal(409, "this worker has no HMAC registry entry for the upload; start it again")
            registry[number] = (tag, etag)
        return jsonify({"part_number": number, "size": expected})

    @app.post("/upload/complete")
    def complete():
        user = authenticate()
        record = file_by_upload(user)
        if record.status == "ready":
            return jsonify({"file_id": record.id, "size": record.size, "hmac": record.hmac})
        with _registry_lock:
            registry = dict(_hmac_registry.get(record.upload_id, {}))
        missing = [n for n in range(1, record.parts + 1) if n not in registry]
        if missing:
            raise Refusal(409, f"{len(missing)} of {record.parts} parts are missing", missing_parts=missing)
        tags = [registry[n][0] for n in range(1, record.parts + 1)]
        file_tag = hmac.new(unwrap(record.mac_key), b"".join(tags), hashlib.sha256).hexdigest()
        store.complete_multipart(record.object_key, record.store_upload_id,
                                 [(n, registry[n][1]) for n in range(1, record.parts + 1)])
        record.status, record.hmac, record.completed = "ready", file_tag, now()
        record.part_tags = json.dumps([tag.hex() for tag in tags])
        db.session.commit()
        with _registry_lock:
            _hmac_registry.pop(record.upload_id, None)
        return jsonify({"file_id": record.id, "size": record.size, "hmac": file_tag})

    def remove(record):
        if record.status == "ready":
            store.delete(record.object_key)
        else:
            store.abort_multipart(record.object_key, record.store_upload_id)
        with _registry_lock:
            _hmac_registry.pop(record.upload_id, None)
        db.session.delete(record)
        db.session.commit()

    @app.post("/upload/abort")
    def abort():
        user = authenticate()
        record = file_by_upload(user)
        if record.status == "ready":
            raise Refusal(409, f"the upload is complete; DELETE /files/{record.id} removes the file")
        remove(record)
        return "", 204

    @app.get("/files")
    def list_files():
        user = authenticate()
        files = db.session.execute(
            db.select(File).filter_by(user_id=user.id).order_by(File.created, File.id)).scalars()
        return jsonify({"files": [record.json() for record in files]})

    @app.delete("/files/<file_id>")
    def delete_file(file_id):
        user = authenticate()
        remove(file_by_id(user, file_id))
        return "", 204

    def byte_range(header, size):
        """(start, end) inclusive, None for the whole file; Refusal 416 if unsatisfiable."""
        if not header or not header.startswith("bytes=") or "," in header:
            return None
        first, _, last = header[len("bytes="):].strip().partition("-")
        try:
            if first == "":
                suffix = int(last)
                if suffix <= 0:
                    raise Refusal(416, f"the range is outside the file's {size} bytes", size=size)
                return max(0, size - suffix), size - 1
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
        except ValueError:
            return None
        if start >= size or end < start:
            raise Refusal(416, f"the range is outside the file's {size} bytes", size=size)
        return start, end

    @app.get("/files/<file_id>")
    def download(file_id):
        user = authenticate()
        record = file_by_id(user, file_id)
        if record.status != "ready":
            raise Refusal(409, "the upload of this file is not complete")
        chosen = byte_range(request.headers.get("Range"), record.size)
        status, (start, end) = (200, (0, record.size - 1)) if chosen is None else (206, chosen)
        key, mac_key, iv = unwrap(record.enc_key), unwrap(record.mac_key), bytes.fromhex(record.iv)
        tags = [bytes.fromhex(tag) for tag in json.loads(record.part_tags)]
        size, part_size, object_key, name = record.size, record.part_size, record.object_key, record.filename
        content_type, file_hmac = record.content_type, record.hmac
        db.session.rollback()

        def part_plaintext(number):
            """Bytes start..=end that lie in part `number`, checked against the part's tag."""
            part_start = (number - 1) * part_size
            part_end = min(number * part_size, size)
            ciphertext = store.get(object_key, part_start, part_end - part_start)
            expected = tags[number - 1]
            if not hmac.compare_digest(hmac.new(mac_key, ciphertext, hashlib.sha256).digest(), expected):
                raise Refusal(500, f"the stored file failed verification (part {number}); it is not served")
            plaintext = decrypt_multipart_chunk(ciphertext, key, iv, part_start)
            del ciphertext
            low, high = max(start, part_start), min(end + 1, part_end)
            if low == part_start and high == part_end:
                return plaintext
            return plaintext[low - part_start:high - part_start]

        first, last = start // part_size + 1, end // part_size + 1
        # The first part is checked before the answer begins: a bad one is an error answer.
        head = part_plaintext(first)

        def generate():
            yield head
            for number in range(first + 1, last + 1):
                yield part_plaintext(number)

        headers = {
            "Content-Length": str(end - start + 1),
            "Accept-Ranges": "bytes",
            "ETag": f'"{file_hmac}"',
            "Content-Disposition": f'attachment; filename="{name}"',
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return Response(generate(), status=status, headers=headers, content_type=content_type,
                        direct_passthrough=True)

    @app.get("/upload/ram-status")
    def ram_status():
        authenticate()
        import psutil
        ram_mb = psutil.Process(os.getpid()).memory_info().rss / 1024 / 1024
        return jsonify({"ram_used_mb": round(ram_mb, 1), "ram_limit_mb": 512,
                        "ram_free_mb": round(512 - ram_mb, 1)})

    return app


def migrate():
    """Makes the data directory, the master key and the tables, and puts SQLite in WAL mode."""
    data_dir = os.environ["LENZEYE_DATA_DIR"]
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    if not os.path.exists(master_key_path(data_dir)):
        descriptor = os.open(master_key_path(data_dir), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(descriptor, "wb") as out:
            out.write(secrets.token_bytes(32))
    app = create_app()
    with app.app_context():
        db.create_all()
        if database_url(data_dir).startswith("sqlite"):
            db.session.execute(text("PRAGMA journal_mode=WAL"))


if __name__ == "__main__":
    if sys.argv[1:] != ["migrate"]:
        sys.exit(f"usage: {sys.argv[0]} migrate")
    migrate()
