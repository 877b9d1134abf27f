//! Users and their API keys. A key is shown once, at creation; the database keeps its SHA-256.

use capabilities::sql::Value;
use serde_json::json;
use sha2::{Digest, Sha256};
use web::Request;

use crate::database::{self, text};
use crate::{Answer, Refusal};

/// The user a request is made by.
pub struct User {
    pub id: String,
}

fn key_hash(api_key: &str) -> String {
    web::hex(&Sha256::digest(api_key.as_bytes()))
}

/// `POST /users`: a new user and its key.
pub fn create() -> Answer {
    let user_id = crate::random_hex(16);
    let api_key = format!("lz_{}", crate::random_hex(32));
    database::execute(
        "INSERT INTO users (id, key_hash, created) VALUES ($1, $2, $3)",
        &[
            text(&user_id),
            text(&key_hash(&api_key)),
            Value::Integer(crate::now()),
        ],
    )?;
    Ok((201, json!({"user_id": user_id, "api_key": api_key})))
}

/// The user whose key the request bears.
pub fn authenticate(request: &Request) -> Result<User, Refusal> {
    let header = request
        .header("authorization")
        .ok_or_else(|| Refusal::new(401, "missing Authorization: Bearer <api_key>"))?;
    let api_key = header
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .ok_or_else(|| Refusal::new(401, "the Authorization header must be Bearer <api_key>"))?;
    let row = database::query_one(
        "SELECT id FROM users WHERE key_hash = $1",
        &[text(&key_hash(api_key))],
    )?
    .ok_or_else(|| Refusal::new(401, "unknown API key"))?;
    Ok(User { id: row.text("id") })
}
