//! The user's files: the list, downloads (verified part by part against the file's HMAC,
//! decrypted inside the host, with `Range`), deletion.

use capabilities::hmac_registry::{self, RegistryError};
use capabilities::{crypto, objects};
use serde_json::json;
use wasip2::http::types::ResponseOutparam;
use wasip2::io::streams::InputStream;
use web::{Request, Unsatisfiable, byte_range, respond_json, respond_streams};

use crate::database::{self, text};
use crate::uploads::{FileRecord, object_refusal, registry_refusal};
use crate::users::User;
use crate::{Answer, Refusal};

/// `GET /files`
pub fn list(user: &User) -> Answer {
    let rows = database::query(
        "SELECT id FROM files WHERE user_id = $1 ORDER BY created, id",
        &[text(&user.id)],
    )?;
    let mut files = Vec::with_capacity(rows.len());
    for row in rows {
        files.push(FileRecord::load(user, &row.text("id"))?.json());
    }
    Ok((200, json!({"files": files})))
}

/// `DELETE /files/{id}`
pub fn delete(user: &User, file_id: &str) -> Answer {
    let file = FileRecord::load(user, file_id)?;
    crate::uploads::remove(&file)?;
    Ok((204, serde_json::Value::Null))
}

/// `GET /files/{id}`: 200 with the whole file, or 206 with a range.
pub fn download(request: &Request, out: ResponseOutparam, user: &User, file_id: &str) {
    if let Err(refusal) = stream_file(request, out, user, file_id) {
        // `stream_file` answers itself once it streams; a refusal comes before that.
        let (status, body, out) = refusal;
        respond_json(out, status, &body);
    }
}

type Unanswered = (u16, serde_json::Value, ResponseOutparam);

fn stream_file(
    request: &Request,
    out: ResponseOutparam,
    user: &User,
    file_id: &str,
) -> Result<(), Unanswered> {
    let refuse = |refusal: Refusal, out| Err((refusal.status, refusal.body, out));
    let file = match FileRecord::load(user, file_id) {
        Ok(file) => file,
        Err(refusal) => return refuse(refusal, out),
    };
    if !file.ready {
        return refuse(
            Refusal::new(409, "the upload of this file is not complete"),
            out,
        );
    }
    let (status, start, end) = match byte_range(request.header("range").as_deref(), file.size) {
        Ok(None) => (200, 0, file.size - 1),
        Ok(Some((start, end))) => (206, start, end),
        Err(Unsatisfiable) => {
            let refusal = Refusal::with(
                416,
                format!("the range is outside the file's {} bytes", file.size),
                json!({"size": file.size}),
            );
            return refuse(refusal, out);
        }
    };
    // Whole parts are read, so each can be checked against its MAC, and each is decrypted
    // under the IV its stored attempt was encrypted with.
    let first = start / file.part_size + 1;
    let last = end / file.part_size + 1;
    let ivs = match PartIvs::load(&file) {
        Ok(ivs) => ivs,
        Err(refusal) => return refuse(refusal, out),
    };
    // The first part is checked before the answer begins: a bad one is an error answer.
    let first_part = match part_plaintext(&file, &ivs, first, start, end) {
        Ok(plaintext) => plaintext,
        Err(refusal) => return refuse(refusal, out),
    };
    let rest = (first + 1..=last).map(|number| {
        part_plaintext(&file, &ivs, number, start, end)
            .map_err(|refusal| format!("part {number}: {}", refusal.body))
    });
    let take = end - start + 1;
    let mut headers = vec![
        ("content-type", file.content_type.clone()),
        ("content-length", take.to_string()),
        ("accept-ranges", "bytes".to_owned()),
        (
            "etag",
            format!("\"{}\"", file.hmac.clone().unwrap_or_default()),
        ),
        (
            "content-disposition",
            format!("attachment; filename=\"{}\"", quoted(&file.filename)),
        ),
    ];
    if status == 206 {
        headers.push((
            "content-range",
            format!("bytes {start}-{end}/{}", file.size),
        ));
    }
    let sources = std::iter::once(Ok(first_part)).chain(rest);
    if let Err(error) = respond_streams(out, status, &headers, sources) {
        // A later part failed verification, or the client went away: the body is cut.
        eprintln!("the download of file {} was cut: {error}", file.id);
    }
    Ok(())
}

/// The IV of each part the registry holds: the one its stored attempt was encrypted with
/// (recorded by the store's etag), or the file's own for parts stored before parts had IVs.
struct PartIvs {
    ivs: Vec<(u32, Vec<u8>)>,
}

impl PartIvs {
    fn load(file: &FileRecord) -> Result<PartIvs, Refusal> {
        let recorded = hmac_registry::parts(&file.id).map_err(registry_refusal)?;
        let rows = database::query(
            "SELECT number, etag, iv FROM part_ivs WHERE file_id = $1",
            &[text(&file.id)],
        )?;
        let ivs = recorded
            .iter()
            .map(|part| {
                let iv = rows
                    .iter()
                    .find(|row| {
                        row.integer("number") == i64::from(part.number)
                            && row.text("etag") == part.etag
                    })
                    .and_then(|row| web::unhex(&row.text("iv")))
                    .unwrap_or_else(|| file.iv.clone());
                (part.number, iv)
            })
            .collect();
        Ok(PartIvs { ivs })
    }

    fn of(&self, number: u64) -> Option<&[u8]> {
        self.ivs
            .iter()
            .find(|(n, _)| u64::from(*n) == number)
            .map(|(_, iv)| iv.as_slice())
    }
}

/// The plaintext of bytes `start..=end` of the file that lie in part `number`: the stored
/// part read whole, checked against its MAC, and decrypted inside the host.
fn part_plaintext(
    file: &FileRecord,
    ivs: &PartIvs,
    number: u64,
    start: u64,
    end: u64,
) -> Result<InputStream, Refusal> {
    let part_start = (number - 1) * file.part_size;
    let part_end = (number * file.part_size).min(file.size);
    let from = start.max(part_start);
    let to = (end + 1).min(part_end);
    let iv = ivs
        .of(number)
        .ok_or_else(|| Refusal::new(500, format!("the registry has no part {number}")))?;
    let (_, source) = objects::get(&file.object_key, part_start, Some(part_end - part_start))
        .map_err(object_refusal)?;
    let verified = hmac_registry::verify_stream(
        &file.id,
        number as u32,
        source,
        from - part_start,
        to - from,
    )
    .map_err(|error| match error {
        RegistryError::Tampered(part) => {
            eprintln!(
                "file {} failed verification at part {part}: not served",
                file.id
            );
            Refusal::new(
                500,
                format!("the stored file failed verification (part {part}); it is not served"),
            )
        }
        error => registry_refusal(error),
    })?;
    crypto::decrypt_stream(&file.enc_key_id, iv, from, verified)
        .map_err(|error| Refusal::new(500, format!("the file's key is unusable: {error:?}")))
}

/// A file name fit for a quoted header parameter.
fn quoted(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() || !c.is_ascii() {
                '_'
            } else {
                c
            }
        })
        .collect()
}
