//! Lenzeye's upload service: users with API keys, encrypted multipart uploads of files of any
//! size, and verified downloads with ranges, on the host's capabilities. File bytes never enter
//! this guest's memory: each part's body streams from the request through encryption and the
//! HMAC registry into storage inside the host, and each download back out through verification
//! and decryption.
//!
//! The API (all JSON; every route but `POST /users` takes `Authorization: Bearer <api_key>`):
//! `POST /users`, `POST /upload/initiate`, `PUT /upload/part`, `POST /upload/complete`,
//! `POST /upload/abort`, `GET /files`, `GET /files/{id}`, `DELETE /files/{id}`,
//! `GET /upload/ram-status`.

mod database;
mod downloads;
mod uploads;
mod users;

use serde_json::{Value as Json, json};
use wasip2::http::types::{IncomingRequest, Method, ResponseOutparam};
use web::{Request, respond_json};

/// An answer other than success: its status and message.
pub struct Refusal {
    pub status: u16,
    pub body: Json,
}

impl Refusal {
    pub fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            body: json!({"error": message.into()}),
        }
    }

    /// A refusal with more to say than its message.
    pub fn with(status: u16, message: impl Into<String>, details: Json) -> Refusal {
        let mut body = json!({"error": message.into()});
        if let (Some(body), Json::Object(details)) = (body.as_object_mut(), details) {
            body.extend(details);
        }
        Refusal { status, body }
    }
}

/// What a route answers: a status and JSON, or a refusal.
pub type Answer = Result<(u16, Json), Refusal>;

struct Lenzeye;

impl wasip2::exports::http::incoming_handler::Guest for Lenzeye {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let request = Request::new(request);
        // Downloads answer with a stream, not JSON.
        if matches!(request.method, Method::Get)
            && let Some(file_id) = request.path.strip_prefix("/files/")
        {
            let file_id = file_id.to_owned();
            return match users::authenticate(&request) {
                Ok(user) => downloads::download(&request, out, &user, &file_id),
                Err(refusal) => respond_json(out, refusal.status, &refusal.body),
            };
        }
        match route(&request) {
            Ok((204, _)) => web::respond_empty(out, 204),
            Ok((status, body)) => respond_json(out, status, &body),
            Err(refusal) => respond_json(out, refusal.status, &refusal.body),
        }
    }
}

wasip2::http::proxy::export!(Lenzeye);

fn route(request: &Request) -> Answer {
    let path = request.path.as_str();
    if path == "/users" {
        return match request.method {
            Method::Post => users::create(),
            _ => Err(not_allowed("POST")),
        };
    }
    let user = users::authenticate(request)?;
    match (&request.method, path) {
        (Method::Post, "/upload/initiate") => uploads::initiate(request, &user),
        (Method::Put, "/upload/part") => uploads::part(request, &user),
        (Method::Post, "/upload/complete") => uploads::complete(request, &user),
        (Method::Post, "/upload/abort") => uploads::abort(request, &user),
        (Method::Get, "/upload/ram-status") => Ok((200, ram_status())),
        (Method::Get, "/files") => downloads::list(&user),
        (Method::Delete, path) if path.starts_with("/files/") => {
            downloads::delete(&user, &path["/files/".len()..])
        }
        (_, "/upload/initiate" | "/upload/complete" | "/upload/abort") => Err(not_allowed("POST")),
        (_, "/upload/part") => Err(not_allowed("PUT")),
        (_, "/files" | "/upload/ram-status") => Err(not_allowed("GET")),
        _ => Err(Refusal::new(404, format!("no route {path}"))),
    }
}

fn not_allowed(allowed: &str) -> Refusal {
    Refusal::new(405, format!("method not allowed here; use {allowed}"))
}

/// The seed's `/upload/ram-status`, from the host's figures, plus this instance's own memory.
fn ram_status() -> Json {
    let figures = capabilities::status::memory();
    let mb = |bytes: u64| (bytes as f64 / 1048576.0 * 10.0).round() / 10.0;
    json!({
        "ram_used_mb": mb(figures.host_resident),
        "ram_limit_mb": mb(figures.host_limit),
        "ram_free_mb": mb(figures.host_limit.saturating_sub(figures.host_resident)),
        "ram_budget_mb": figures.host_budget.map(mb),
        "worker_ram_used_mb": mb(figures.worker_resident),
        "instance_memory_mb": mb(figures.instance_used),
        "instance_memory_limit_mb": mb(figures.instance_limit),
    })
}

/// Random bytes as hex, for ids and keys.
pub fn random_hex(bytes: u64) -> String {
    web::hex(&wasip2::random::random::get_random_bytes(bytes))
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    wasip2::clocks::wall_clock::now().seconds as i64
}
