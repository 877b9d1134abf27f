//! Uploads: initiate, parts (in any order, at once, again), complete, abort. Each part's body
//! streams through `crypto.encrypt-stream` (AES-256-CTR at the part's offset in the file), a
//! registry `tap` (its HMAC) and `objects.upload-part` inside the host.
//!
//! Every attempt at a part is encrypted under an IV of its own, recorded with the store's etag
//! of what it stored: a part sent again with other bytes never reuses the keystream of an
//! earlier attempt (which would give anyone holding both ciphertexts their plaintexts' XOR).

use capabilities::hmac_registry::{self, RegistryError};
use capabilities::objects::{self, ObjectError};
use capabilities::{crypto, sql::Value};
use serde_json::{Value as Json, json};
use web::Request;

use crate::database::{self, Row, text};
use crate::users::User;
use crate::{Answer, Refusal};

const DEFAULT_PART_SIZE: u64 = 10 * 1024 * 1024;
/// S3's smallest part (but the last).
const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
const MAX_PARTS: u64 = 10_000;
const MAX_FILENAME: usize = 1024;

/// A file, as its row says.
pub struct FileRecord {
    pub id: String,
    pub filename: String,
    pub content_type: String,
    pub size: u64,
    pub part_size: u64,
    pub parts: u64,
    pub ready: bool,
    pub object_key: String,
    pub store_upload_id: String,
    pub enc_key_id: String,
    pub iv: Vec<u8>,
    pub hmac: Option<String>,
    pub created: i64,
}

const COLUMNS: &str = "id, filename, content_type, size, part_size, parts, status, \
    object_key, store_upload_id, enc_key_id, iv, hmac, created";

impl FileRecord {
    fn from_row(row: &Row) -> FileRecord {
        FileRecord {
            id: row.text("id"),
            filename: row.text("filename"),
            content_type: row.text("content_type"),
            size: row.integer("size") as u64,
            part_size: row.integer("part_size") as u64,
            parts: row.integer("parts") as u64,
            ready: row.text("status") == "ready",
            object_key: row.text("object_key"),
            store_upload_id: row.text("store_upload_id"),
            enc_key_id: row.text("enc_key_id"),
            iv: web::unhex(&row.text("iv")).unwrap_or_default(),
            hmac: row.optional_text("hmac"),
            created: row.integer("created"),
        }
    }

    /// The user's file of this id; another user's is not found.
    pub fn load(user: &User, file_id: &str) -> Result<FileRecord, Refusal> {
        database::query_one(
            &format!("SELECT {COLUMNS} FROM files WHERE id = $1 AND user_id = $2"),
            &[text(file_id), text(&user.id)],
        )?
        .map(|row| FileRecord::from_row(&row))
        .ok_or_else(|| Refusal::new(404, format!("no file {file_id}")))
    }

    /// The user's upload of this id; another user's is not found.
    fn by_upload(request: &Request, user: &User) -> Result<FileRecord, Refusal> {
        let upload_id = request
            .param("upload_id")
            .ok_or_else(|| Refusal::new(400, "upload_id is missing from the query"))?;
        database::query_one(
            &format!("SELECT {COLUMNS} FROM files WHERE upload_id = $1 AND user_id = $2"),
            &[text(upload_id), text(&user.id)],
        )?
        .map(|row| FileRecord::from_row(&row))
        .ok_or_else(|| Refusal::new(404, format!("no upload {upload_id}")))
    }

    /// The size of part `number`: the part size, but for the last.
    pub fn part_length(&self, number: u64) -> u64 {
        if number < self.parts {
            self.part_size
        } else {
            self.size - (self.parts - 1) * self.part_size
        }
    }

    pub fn json(&self) -> Json {
        json!({
            "file_id": self.id,
            "filename": self.filename,
            "size": self.size,
            "content_type": self.content_type,
            "status": if self.ready { "ready" } else { "uploading" },
            "hmac": self.hmac,
            "created": self.created,
        })
    }
}

/// The part size this deployment uses: `LENZEYE_PART_SIZE` (given to the host with
/// `-e LENZEYE_PART_SIZE=…`), else 10 MiB.
fn part_size() -> u64 {
    std::env::var("LENZEYE_PART_SIZE")
        .ok()
        .and_then(|size| size.trim().parse::<u64>().ok())
        .filter(|size| *size >= MIN_PART_SIZE)
        .unwrap_or(DEFAULT_PART_SIZE)
}

pub fn object_refusal(error: ObjectError) -> Refusal {
    match error {
        ObjectError::Unavailable(why) => {
            Refusal::new(503, format!("the storage is unavailable, try again: {why}"))
        }
        ObjectError::LengthMismatch(why) => {
            Refusal::new(400, format!("the part's body is not its size: {why}"))
        }
        ObjectError::SourceFailed(why) => {
            Refusal::new(400, format!("the part's body could not be read: {why}"))
        }
        ObjectError::NoSuchUpload => Refusal::new(404, "the storage no longer has this upload"),
        ObjectError::NotFound => Refusal::new(404, "the stored file is missing"),
        other => Refusal::new(500, format!("the storage refused: {other:?}")),
    }
}

pub fn registry_refusal(error: RegistryError) -> Refusal {
    match error {
        RegistryError::Unavailable(why) => Refusal::new(
            503,
            format!("the HMAC registry is unavailable, try again: {why}"),
        ),
        RegistryError::Finished => {
            Refusal::new(409, "the upload is complete: it takes no more parts")
        }
        RegistryError::MismatchedParts(parts) => Refusal::with(
            409,
            "these parts changed or were not recorded; send them again",
            json!({"resend_parts": parts}),
        ),
        RegistryError::MissingParts(parts) => {
            Refusal::with(409, "parts are missing", json!({"missing_parts": parts}))
        }
        // The host discarded it: the upload was abandoned past --upload-expiry.
        RegistryError::UnknownEntry => Refusal::new(404, "the registry no longer has this upload"),
        other => Refusal::new(500, format!("the HMAC registry refused: {other:?}")),
    }
}

/// `POST /upload/initiate {"filename", "size", "content_type"?}`
pub fn initiate(request: &Request, user: &User) -> Answer {
    let body: Json = request
        .body(64 * 1024)
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| {
            Refusal::new(
                400,
                "the body must be JSON: {\"filename\", \"size\", \"content_type\"?}",
            )
        })?;
    let filename = body["filename"]
        .as_str()
        .map(str::trim)
        .filter(|name| !name.is_empty() && name.len() <= MAX_FILENAME)
        .ok_or_else(|| {
            Refusal::new(
                400,
                format!("filename must be a non-empty string of at most {MAX_FILENAME} bytes"),
            )
        })?;
    let size = body["size"]
        .as_u64()
        .filter(|size| *size >= 1)
        .ok_or_else(|| Refusal::new(400, "size must be a whole number of bytes, at least 1"))?;
    let content_type = match &body["content_type"] {
        Json::Null => "application/octet-stream",
        Json::String(content_type) if !content_type.is_empty() && content_type.len() <= 255 => {
            content_type
        }
        _ => {
            return Err(Refusal::new(
                400,
                "content_type must be a string of at most 255 bytes",
            ));
        }
    };
    let part_size = part_size();
    let parts = size.div_ceil(part_size);
    if parts > MAX_PARTS {
        return Err(Refusal::new(
            400,
            format!("{size} bytes is more than {MAX_PARTS} parts of {part_size} bytes"),
        ));
    }

    let file_id = crate::random_hex(16);
    let upload_id = crate::random_hex(16);
    let object_key = format!("files/{file_id}");
    let enc_key_id = crypto::generate_key();
    let mac_key_id = crypto::generate_key();
    let iv = crate::random_hex(16);
    let store_upload_id = objects::create_multipart(&object_key).map_err(object_refusal)?;
    // What is made before a failure is undone, so a failed initiate leaves nothing.
    let undo = || {
        let _ = objects::abort_multipart(&object_key, &store_upload_id);
        let _ = hmac_registry::discard(&file_id);
    };
    if let Err(error) = hmac_registry::begin(&file_id, &mac_key_id) {
        undo();
        return Err(registry_refusal(error));
    }
    let inserted = database::execute(
        "INSERT INTO files (id, user_id, upload_id, filename, content_type, size, part_size, parts,
            status, object_key, store_upload_id, enc_key_id, mac_key_id, iv, created)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'uploading', $9, $10, $11, $12, $13, $14)",
        &[
            text(&file_id),
            text(&user.id),
            text(&upload_id),
            text(filename),
            text(content_type),
            Value::Integer(size as i64),
            Value::Integer(part_size as i64),
            Value::Integer(parts as i64),
            text(&object_key),
            text(&store_upload_id),
            text(&enc_key_id),
            text(&mac_key_id),
            text(&iv),
            Value::Integer(crate::now()),
        ],
    );
    if let Err(refusal) = inserted {
        undo();
        return Err(refusal);
    }
    Ok((
        201,
        json!({"upload_id": upload_id, "file_id": file_id, "part_size": part_size, "parts": parts}),
    ))
}

/// `PUT /upload/part?upload_id=U&part_number=N`, the body being the part's plaintext.
pub fn part(request: &Request, user: &User) -> Answer {
    let file = FileRecord::by_upload(request, user)?;
    if file.ready {
        return Err(Refusal::new(
            409,
            "the upload is complete: it takes no more parts",
        ));
    }
    let number = request
        .param("part_number")
        .and_then(|number| number.parse::<u64>().ok())
        .filter(|number| (1..=file.parts).contains(number))
        .ok_or_else(|| {
            Refusal::new(
                400,
                format!(
                    "part_number must be a whole number from 1 to {}",
                    file.parts
                ),
            )
        })?;
    let expected = file.part_length(number);
    let length = request.content_length().ok_or_else(|| {
        Refusal::new(
            411,
            format!("a part needs a Content-Length ({expected} bytes for part {number})"),
        )
    })?;
    if length != expected {
        return Err(Refusal::new(
            400,
            format!("part {number} must be {expected} bytes, the body is {length}"),
        ));
    }
    let (_body, plaintext) = request
        .body_stream()
        .ok_or_else(|| Refusal::new(400, "the part has no body"))?;
    let offset = (number - 1) * file.part_size;
    let iv = crate::random_hex(16);
    let iv_bytes = web::unhex(&iv).unwrap_or_default();
    let ciphertext = crypto::encrypt_stream(&file.enc_key_id, &iv_bytes, offset, plaintext)
        .map_err(|error| Refusal::new(500, format!("the file's key is unusable: {error:?}")))?;
    let (tapped, mac) =
        hmac_registry::tap(&file.id, number as u32, ciphertext).map_err(registry_refusal)?;
    let stored = objects::upload_part(
        &file.object_key,
        &file.store_upload_id,
        number as u32,
        tapped,
        expected,
    )
    .map_err(object_refusal)?;
    // Recorded before the registry takes the part, so every part it takes has its IV.
    database::execute(
        "INSERT INTO part_ivs (file_id, number, etag, iv) VALUES ($1, $2, $3, $4)
         ON CONFLICT (file_id, number, etag) DO NOTHING",
        &[
            text(&file.id),
            Value::Integer(number as i64),
            text(&stored.etag),
            text(&iv),
        ],
    )?;
    hmac_registry::add_part(&file.id, mac, &stored.etag).map_err(registry_refusal)?;
    Ok((200, json!({"part_number": number, "size": expected})))
}

/// `POST /upload/complete?upload_id=U`
pub fn complete(request: &Request, user: &User) -> Answer {
    let file = FileRecord::by_upload(request, user)?;
    let done = |hmac: &str| {
        (
            200,
            json!({"file_id": file.id, "size": file.size, "hmac": hmac}),
        )
    };
    if let (true, Some(hmac)) = (file.ready, &file.hmac) {
        return Ok(done(hmac));
    }
    let stored = match objects::list_parts(&file.object_key, &file.store_upload_id) {
        Ok(stored) => stored,
        // Completed in the storage by an earlier try that could not mark the file ready.
        Err(ObjectError::NoSuchUpload) => return recover_completed(&file).map(|hmac| done(&hmac)),
        Err(error) => return Err(object_refusal(error)),
    };
    let missing: Vec<u64> = (1..=file.parts)
        .filter(|number| !stored.iter().any(|part| u64::from(part.number) == *number))
        .collect();
    if !missing.is_empty() {
        return Err(Refusal::with(
            409,
            format!("{} of {} parts are missing", missing.len(), file.parts),
            json!({"missing_parts": missing}),
        ));
    }
    let wrong: Vec<u32> = stored
        .iter()
        .filter(|part| part.size != file.part_length(u64::from(part.number)))
        .map(|part| part.number)
        .collect();
    if !wrong.is_empty() {
        return Err(Refusal::with(
            409,
            "these parts have the wrong size; send them again",
            json!({"resend_parts": wrong}),
        ));
    }
    let hmac = hmac_registry::finish(&file.id, &capabilities::registry_parts(&stored))
        .map_err(registry_refusal)?;
    objects::complete_multipart(&file.object_key, &file.store_upload_id, &stored)
        .map_err(object_refusal)?;
    mark_ready(&file, &hmac)?;
    Ok(done(&hmac))
}

/// The storage has the whole object and the registry its tag: only the row was not updated.
fn recover_completed(file: &FileRecord) -> Result<String, Refusal> {
    // Checked first: an upload aborted in the storage (past --upload-expiry, say) has an
    // unfinished registry entry, or none, and is told as gone, not as a registry failure.
    match objects::head(&file.object_key).map_err(object_refusal)? {
        Some(object) if object.size == file.size => {
            let hmac = hmac_registry::tag(&file.id).map_err(registry_refusal)?;
            mark_ready(file, &hmac)?;
            Ok(hmac)
        }
        _ => Err(Refusal::new(
            409,
            "the upload is gone from the storage; start it again",
        )),
    }
}

fn mark_ready(file: &FileRecord, hmac: &str) -> Result<(), Refusal> {
    database::execute(
        "UPDATE files SET status = 'ready', hmac = $1, completed = $2 WHERE id = $3",
        &[text(hmac), Value::Integer(crate::now()), text(&file.id)],
    )?;
    Ok(())
}

/// `POST /upload/abort?upload_id=U`: nothing of the upload is left.
pub fn abort(request: &Request, user: &User) -> Answer {
    let file = FileRecord::by_upload(request, user)?;
    if file.ready {
        return Err(Refusal::new(
            409,
            format!(
                "the upload is complete; DELETE /files/{} removes the file",
                file.id
            ),
        ));
    }
    remove(&file)?;
    Ok((204, Json::Null))
}

/// Removes everything of a file: its stored bytes or upload, its registry entry, its row.
pub fn remove(file: &FileRecord) -> Result<(), Refusal> {
    if file.ready {
        objects::delete(&file.object_key).map_err(object_refusal)?;
    } else {
        match objects::abort_multipart(&file.object_key, &file.store_upload_id) {
            Ok(()) | Err(ObjectError::NoSuchUpload) => {}
            Err(error) => return Err(object_refusal(error)),
        }
    }
    hmac_registry::discard(&file.id).map_err(registry_refusal)?;
    database::execute("DELETE FROM part_ivs WHERE file_id = $1", &[text(&file.id)])?;
    database::execute("DELETE FROM files WHERE id = $1", &[text(&file.id)])?;
    Ok(())
}
