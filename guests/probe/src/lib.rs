//! A guest that puts each host capability behind an HTTP route, for the host's tests: object
//! storage and multipart uploads, the HMAC registry, encryption streams, SQL. Run under two
//! names, it is also the hostile neighbour of the isolation tests: it can ask for anything by
//! name, and the host must keep it to its own.

use capabilities::hmac_registry::{self, Part, RegistryError};
use capabilities::objects::{self, ObjectError, ObjectInfo, PartInfo};
use capabilities::{crypto, sql};
use serde_json::{Value as Json, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};
use web::{Request, respond_json, respond_stream};

/// The most a JSON request body may be.
const JSON_LIMIT: usize = 1 << 20;

struct Probe;

impl wasip2::exports::http::incoming_handler::Guest for Probe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let request = Request::new(request);
        let answer = match request.path.as_str() {
            "/" => Ok(json!({"probe": "ok"})),
            "/crypto/key" => Ok(json!({"key_id": crypto::generate_key()})),
            "/crypto/apply" => crypto_apply(&request),
            "/objects/multipart" => objects::create_multipart(key(&request))
                .map(|id| json!({"upload_id": id}))
                .map_err(object_error),
            "/objects/part" => upload_part(&request),
            "/objects/parts" => objects::list_parts(key(&request), param(&request, "upload_id"))
                .map(|parts| json!(parts.iter().map(part_json).collect::<Vec<_>>()))
                .map_err(object_error),
            "/objects/complete" => complete(&request),
            "/objects/abort" => {
                objects::abort_multipart(key(&request), param(&request, "upload_id"))
                    .map(|()| json!({"aborted": true}))
                    .map_err(object_error)
            }
            "/objects/put" => {
                objects::put(key(&request), &request.body(64 << 20).unwrap_or_default())
                    .map(|info| info_json(&info))
                    .map_err(object_error)
            }
            "/objects/get" => return get(request, out),
            "/objects/hoard" => hoard(&request),
            "/objects/head" => objects::head(key(&request))
                .map(|info| info.map_or(Json::Null, |info| info_json(&info)))
                .map_err(object_error),
            "/objects/delete" => objects::delete(key(&request))
                .map(|()| json!({"deleted": true}))
                .map_err(object_error),
            "/objects/list" => objects::list_objects(param(&request, "prefix"))
                .map(|list| json!(list.iter().map(info_json).collect::<Vec<_>>()))
                .map_err(object_error),
            "/registry/begin" => {
                hmac_registry::begin(param(&request, "name"), param(&request, "key_id"))
                    .map(|()| json!({"begun": true}))
                    .map_err(registry_error)
            }
            "/registry/add-bytes" => hmac_registry::add_part_bytes(
                param(&request, "name"),
                u32::try_from(number(&request, "part")).unwrap_or(u32::MAX),
                &request.body(64 << 20).unwrap_or_default(),
                param(&request, "etag"),
            )
            .map(|part| registry_part_json(&part))
            .map_err(registry_error),
            "/registry/parts" => hmac_registry::parts(param(&request, "name"))
                .map(|parts| json!(parts.iter().map(registry_part_json).collect::<Vec<_>>()))
                .map_err(registry_error),
            "/registry/finish" => finish(&request),
            "/registry/finish-list" => finish_list(&request),
            "/registry/tag" => hmac_registry::tag(param(&request, "name"))
                .map(|tag| json!({"tag": tag}))
                .map_err(registry_error),
            "/registry/discard" => hmac_registry::discard(param(&request, "name"))
                .map(|()| json!({"discarded": true}))
                .map_err(registry_error),
            "/pipeline/part" => pipeline_part(&request),
            "/pipeline/read" => return pipeline_read(request, out),
            "/bench/seal" => bench_seal(&request),
            "/sql/query" => run_sql(&request, false),
            "/sql/execute" => run_sql(&request, true),
            "/sql/transaction" => transaction(&request),
            _ => Err((404, json!({"error": "no such route"}))),
        };
        match answer {
            Ok(body) => respond_json(out, 200, &body),
            Err((status, body)) => respond_json(out, status, &body),
        }
    }
}

wasip2::http::proxy::export!(Probe);

type Answer = Result<Json, (u16, Json)>;

fn param<'a>(request: &'a Request, name: &str) -> &'a str {
    request.param(name).unwrap_or_default()
}

fn key(request: &Request) -> &str {
    param(request, "key")
}

fn number(request: &Request, name: &str) -> u64 {
    param(request, name).parse().unwrap_or(0)
}

fn object_error(error: ObjectError) -> (u16, Json) {
    let status = match &error {
        ObjectError::NotFound | ObjectError::NoSuchUpload => 404,
        ObjectError::Unavailable(_) | ObjectError::SourceFailed(_) => 503,
        ObjectError::InvalidRange => 416,
        _ => 400,
    };
    (status, json!({"error": format!("{error:?}")}))
}

fn registry_error(error: RegistryError) -> (u16, Json) {
    let status = match &error {
        RegistryError::UnknownEntry => 404,
        RegistryError::Unavailable(_) => 503,
        RegistryError::Tampered(_) => 500,
        RegistryError::MissingParts(_) | RegistryError::MismatchedParts(_) => 409,
        _ => 400,
    };
    (status, json!({"error": format!("{error:?}")}))
}

fn part_json(part: &PartInfo) -> Json {
    json!({"number": part.number, "size": part.size, "etag": part.etag})
}

fn registry_part_json(part: &Part) -> Json {
    json!({"number": part.number, "size": part.size, "etag": part.etag})
}

fn info_json(info: &ObjectInfo) -> Json {
    json!({"key": info.key, "size": info.size, "etag": info.etag, "modified": info.modified})
}

/// The body streamed into part `part` of an upload, declared `length` bytes long (by default,
/// the body's length).
fn upload_part(request: &Request) -> Answer {
    let length = request
        .param("length")
        .and_then(|length| length.parse().ok())
        .or(request.content_length())
        .ok_or((411, json!({"error": "no content-length"})))?;
    let (_body, stream) = request
        .body_stream()
        .ok_or((400, json!({"error": "no body"})))?;
    objects::upload_part(
        key(request),
        param(request, "upload_id"),
        number(request, "part") as u32,
        stream,
        length,
    )
    .map(|part| part_json(&part))
    .map_err(object_error)
}

fn complete(request: &Request) -> Answer {
    let (key, upload_id) = (key(request), param(request, "upload_id"));
    let parts = objects::list_parts(key, upload_id).map_err(object_error)?;
    objects::complete_multipart(key, upload_id, &parts)
        .map(|info| info_json(&info))
        .map_err(object_error)
}

fn get(request: Request, out: ResponseOutparam) {
    let length = request.param("length").and_then(|l| l.parse().ok());
    match objects::get(key(&request), number(&request, "start"), length) {
        Ok((info, stream)) => {
            let headers = [
                ("content-type", "application/octet-stream".to_owned()),
                ("x-object-size", info.size.to_string()),
            ];
            let _ = respond_stream(out, 200, &headers, stream);
        }
        Err(error) => {
            let (status, body) = object_error(error);
            respond_json(out, status, &body);
        }
    }
}

/// Lenzeye's upload path: body → encrypt-stream → tap → upload-part → add-part, with the
/// plaintext at `offset` of the file.
fn pipeline_part(request: &Request) -> Answer {
    let length = request
        .content_length()
        .ok_or((411, json!({"error": "no content-length"})))?;
    let iv = web::unhex(param(request, "iv")).unwrap_or_default();
    let (key, upload_id, name) = (
        key(request),
        param(request, "upload_id"),
        param(request, "name"),
    );
    let part = number(request, "part") as u32;
    let (_body, body) = request
        .body_stream()
        .ok_or((400, json!({"error": "no body"})))?;
    let ciphertext =
        crypto::encrypt_stream(param(request, "enc"), &iv, number(request, "offset"), body)
            .map_err(|error| (400, json!({"error": format!("{error:?}")})))?;
    let (tapped, mac) = hmac_registry::tap(name, part, ciphertext).map_err(registry_error)?;
    let stored =
        objects::upload_part(key, upload_id, part, tapped, length).map_err(object_error)?;
    let recorded = hmac_registry::add_part(name, mac, &stored.etag).map_err(registry_error)?;
    Ok(json!({"stored": part_json(&stored), "recorded": registry_part_json(&recorded)}))
}

/// The body encrypted (`mode=encrypt`), decrypted (`decrypt`) or encrypted as a stream
/// (`stream`) under `enc`, `iv` (hex) at `offset`; the result in hex.
fn crypto_apply(request: &Request) -> Answer {
    use wasip2::io::streams::StreamError;
    let iv = web::unhex(param(request, "iv")).unwrap_or_default();
    let (enc, offset) = (param(request, "enc"), number(request, "offset"));
    let refused = |error: crypto::CryptoError| (400, json!({"error": format!("{error:?}")}));
    let data = match param(request, "mode") {
        "stream" => {
            let (_body, body) = request
                .body_stream()
                .ok_or((400, json!({"error": "no body"})))?;
            let sealed = crypto::encrypt_stream(enc, &iv, offset, body).map_err(refused)?;
            let mut data = Vec::new();
            loop {
                match sealed.blocking_read(64 * 1024) {
                    Ok(chunk) => data.extend_from_slice(&chunk),
                    Err(StreamError::Closed) => break data,
                    Err(StreamError::LastOperationFailed(error)) => {
                        return Err((
                            400,
                            json!({"error": "stream failed", "detail": error.to_debug_string()}),
                        ));
                    }
                }
            }
        }
        mode => {
            let body = request.body(JSON_LIMIT).unwrap_or_default();
            let apply = if mode == "decrypt" {
                crypto::decrypt
            } else {
                crypto::encrypt
            };
            apply(enc, &iv, offset, &body).map_err(refused)?
        }
    };
    Ok(json!({"data": web::hex(&data)}))
}

/// `finish` with the parts list of the body (`[{"number", "size", "etag"}]`), as a hostile
/// guest may claim anything.
fn finish_list(request: &Request) -> Answer {
    let claimed: Vec<hmac_registry::Part> = json_body(request)?
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|part| hmac_registry::Part {
            number: part["number"].as_u64().unwrap_or(0) as u32,
            size: part["size"].as_u64().unwrap_or(0),
            etag: part["etag"].as_str().unwrap_or_default().to_owned(),
        })
        .collect();
    hmac_registry::finish(param(request, "name"), &claimed)
        .map(|tag| json!({"tag": tag}))
        .map_err(registry_error)
}

/// Completes the object and finishes its tag, checked against the stored parts.
/// A hostile guest: opens the object `count` times, each read encrypted by a stage that runs
/// ahead of its reader, starts every one and keeps them all.
fn hoard(request: &Request) -> Answer {
    let mut held = Vec::new();
    for _ in 0..number(request, "count") {
        let (_, source) = objects::get(key(request), 0, None).map_err(object_error)?;
        let sealed = crypto::encrypt_stream(param(request, "enc"), &[0; 16], 0, source)
            .map_err(|error| (400, json!({"error": format!("{error:?}")})))?;
        // One byte read starts the stage, which then reads ahead of it.
        let _ = sealed.blocking_read(1);
        held.push(sealed);
    }
    Ok(json!({"held": held.len()}))
}

fn finish(request: &Request) -> Answer {
    let (key, upload_id, name) = (
        key(request),
        param(request, "upload_id"),
        param(request, "name"),
    );
    let parts = objects::list_parts(key, upload_id).map_err(object_error)?;
    let mut claimed = capabilities::registry_parts(&parts);
    // `claim=N`: a hostile guest's claim that part N is stored too.
    if let Ok(number) = param(request, "claim").parse::<u32>() {
        claimed.push(hmac_registry::Part {
            number,
            size: 0,
            etag: String::new(),
        });
    }
    let tag = hmac_registry::finish(name, &claimed).map_err(registry_error)?;
    let info = objects::complete_multipart(key, upload_id, &parts).map_err(object_error)?;
    Ok(json!({"tag": tag, "object": info_json(&info)}))
}

/// Lenzeye's download path: the object's parts from `first` → verify-stream → decrypt-stream.
/// `part_size` says where parts start; `skip` and `take` are counted from part `first`.
fn pipeline_read(request: Request, out: ResponseOutparam) {
    let part_size = number(&request, "part_size");
    let first = number(&request, "first").max(1);
    let (skip, take) = (number(&request, "skip"), number(&request, "take"));
    let start = (first - 1) * part_size;
    let iv = web::unhex(param(&request, "iv")).unwrap_or_default();
    let source = match objects::get(key(&request), start, None) {
        Ok((_, stream)) => stream,
        Err(error) => {
            let (status, body) = object_error(error);
            return respond_json(out, status, &body);
        }
    };
    let verified = match hmac_registry::verify_stream(
        param(&request, "name"),
        first as u32,
        source,
        skip,
        take,
    ) {
        Ok(stream) => stream,
        Err(error) => {
            let (status, body) = registry_error(error);
            return respond_json(out, status, &body);
        }
    };
    match crypto::decrypt_stream(param(&request, "enc"), &iv, start + skip, verified) {
        Ok(plaintext) => {
            let headers = [("content-type", "application/octet-stream".to_owned())];
            if let Err(error) = respond_stream(out, 200, &headers, plaintext) {
                eprintln!("the download was cut: {error}");
            }
        }
        Err(error) => respond_json(out, 400, &json!({"error": format!("{error:?}")})),
    }
}

fn sql_value(value: &Json) -> sql::Value {
    match value {
        Json::Null => sql::Value::Null,
        Json::Bool(flag) => sql::Value::Boolean(*flag),
        Json::Number(number) => match number.as_i64() {
            Some(integer) => sql::Value::Integer(integer),
            None => sql::Value::Real(number.as_f64().unwrap_or(0.0)),
        },
        Json::String(text) => sql::Value::Text(text.clone()),
        // {"blob": "hex"}
        Json::Object(object) => sql::Value::Blob(
            object
                .get("blob")
                .and_then(Json::as_str)
                .and_then(web::unhex)
                .unwrap_or_default(),
        ),
        Json::Array(_) => sql::Value::Null,
    }
}

fn json_value(value: &sql::Value) -> Json {
    match value {
        sql::Value::Null => Json::Null,
        sql::Value::Integer(integer) => json!(integer),
        sql::Value::Real(real) => json!(real),
        sql::Value::Text(text) => json!(text),
        sql::Value::Blob(bytes) => json!({"blob": web::hex(bytes)}),
        sql::Value::Boolean(flag) => json!(flag),
    }
}

fn sql_error(error: sql::SqlError) -> (u16, Json) {
    let status = match &error {
        sql::SqlError::Unavailable(_) => 503,
        _ => 400,
    };
    let detail = match &error {
        sql::SqlError::Database(refused) => json!({
            "kind": "database", "code": refused.code, "message": refused.message,
            "constraint": refused.constraint,
        }),
        other => json!({"kind": format!("{other:?}")}),
    };
    (status, json!({"error": detail}))
}

fn rows_json(rows: &sql::Rows) -> Json {
    json!({
        "columns": rows.columns,
        "rows": rows.rows.iter().map(|row| row.iter().map(json_value).collect::<Vec<_>>()).collect::<Vec<_>>(),
    })
}

/// `{"statement": …, "params": […]}` from the body.
fn statement(body: &Json) -> (String, Vec<sql::Value>) {
    let text = body["statement"].as_str().unwrap_or_default().to_owned();
    let params = body["params"]
        .as_array()
        .map(|params| params.iter().map(sql_value).collect())
        .unwrap_or_default();
    (text, params)
}

fn json_body(request: &Request) -> Result<Json, (u16, Json)> {
    request
        .body(JSON_LIMIT)
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or((400, json!({"error": "the body must be JSON"})))
}

fn run_sql(request: &Request, execute: bool) -> Answer {
    let (text, params) = statement(&json_body(request)?);
    if execute {
        sql::execute(&text, &params)
            .map(|changed| json!({"rows_affected": changed}))
            .map_err(sql_error)
    } else {
        sql::query(&text, &params)
            .map(|rows| rows_json(&rows))
            .map_err(sql_error)
    }
}

/// The body's statements in one transaction, committed if `?commit=true`, else rolled back.
fn transaction(request: &Request) -> Answer {
    let body = json_body(request)?;
    let transaction = sql::begin().map_err(sql_error)?;
    let mut results = Vec::new();
    for step in body.as_array().cloned().unwrap_or_default() {
        let (text, params) = statement(&step);
        let result = transaction.query(&text, &params).map_err(sql_error)?;
        results.push(rows_json(&result));
    }
    if param(request, "commit") == "true" {
        transaction.commit().map_err(sql_error)?;
    } else {
        transaction.rollback().map_err(sql_error)?;
    }
    Ok(json!(results))
}

/// Throughput of the upload path's bulk work: the stored object `key` read through
/// encrypt-stream and a registry tap (entry `name`), measured inside the guest. `stages` says
/// which: `seal` (both, the default), `encrypt`, `mac`, or `none` (the reading alone).
fn bench_seal(request: &Request) -> Answer {
    use wasip2::clocks::monotonic_clock;
    use wasip2::io::streams::StreamError;
    let stages = request.param("stages").unwrap_or("seal");
    let (_, source) = objects::get(key(request), 0, None).map_err(object_error)?;
    let started = monotonic_clock::now();
    let mut stream = source;
    if stages == "seal" || stages == "encrypt" {
        stream = crypto::encrypt_stream(param(request, "enc"), &[0; 16], 0, stream)
            .map_err(|error| (400, json!({"error": format!("{error:?}")})))?;
    }
    let mut _mac = None;
    if stages == "seal" || stages == "mac" {
        let (tapped, mac) =
            hmac_registry::tap(param(request, "name"), 1, stream).map_err(registry_error)?;
        stream = tapped;
        _mac = Some(mac);
    }
    // `skip` leaves the bytes in the host, as the store does when it takes a part's stream;
    // `read` copies them into the guest.
    let skip = request.param("consume") == Some("skip");
    let mut total = 0u64;
    loop {
        let consumed = if skip {
            stream.blocking_skip(web::CHUNK)
        } else {
            stream
                .blocking_read(web::CHUNK)
                .map(|chunk| chunk.len() as u64)
        };
        match consumed {
            Ok(length) => total += length,
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(error)) => {
                return Err((500, json!({"error": error.to_debug_string()})));
            }
        }
    }
    let seconds = (monotonic_clock::now() - started) as f64 / 1e9;
    Ok(json!({"bytes": total, "seconds": seconds, "mib_per_s": total as f64 / seconds / 1048576.0}))
}
