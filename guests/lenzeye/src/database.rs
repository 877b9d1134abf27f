//! Lenzeye's tables, on the host's SQL capability: the same statements on SQLite and
//! PostgreSQL. The tables are made the first time a statement finds them missing.

use capabilities::sql::{self, SqlError, Value};

use crate::Refusal;

const SCHEMA: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS users (
        id TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        created BIGINT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS files (
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
    )",
    "CREATE INDEX IF NOT EXISTS files_by_user ON files (user_id, created)",
    // The IV each stored attempt of a part was encrypted with, by the store's etag of it.
    "CREATE TABLE IF NOT EXISTS part_ivs (
        file_id TEXT NOT NULL,
        number BIGINT NOT NULL,
        etag TEXT NOT NULL,
        iv TEXT NOT NULL,
        PRIMARY KEY (file_id, number, etag)
    )",
];

/// A row, by column name.
pub struct Row {
    columns: std::rc::Rc<Vec<String>>,
    values: Vec<Value>,
}

impl Row {
    fn value(&self, column: &str) -> &Value {
        self.columns
            .iter()
            .position(|name| name == column)
            .map_or(&Value::Null, |index| &self.values[index])
    }

    pub fn text(&self, column: &str) -> String {
        match self.value(column) {
            Value::Text(text) => text.clone(),
            _ => String::new(),
        }
    }

    pub fn optional_text(&self, column: &str) -> Option<String> {
        match self.value(column) {
            Value::Text(text) => Some(text.clone()),
            _ => None,
        }
    }

    pub fn integer(&self, column: &str) -> i64 {
        match self.value(column) {
            Value::Integer(number) => *number,
            _ => 0,
        }
    }
}

/// The database's answer as a refusal: 503 when it cannot be reached (the client may retry),
/// 500 when it refused the statement (a fault of this app).
fn refusal(error: SqlError) -> Refusal {
    match error {
        SqlError::Unavailable(why) => Refusal::new(
            503,
            format!("the database is unavailable, try again: {why}"),
        ),
        SqlError::Database(refused) => {
            eprintln!("the database refused a statement: {}", refused.message);
            Refusal::new(
                500,
                format!("the database refused the request: {}", refused.message),
            )
        }
        other => Refusal::new(500, format!("the database failed: {other:?}")),
    }
}

fn missing_table(error: &SqlError) -> bool {
    match error {
        SqlError::Database(refused) => {
            refused.code.as_deref() == Some("42P01") || refused.message.contains("no such table")
        }
        _ => false,
    }
}

/// Whether making a table or index failed only because another request made it at the same
/// time (PostgreSQL: a unique violation on its catalog, or the relation already there).
fn made_by_another(error: &SqlError) -> bool {
    matches!(error, SqlError::Database(refused)
        if matches!(refused.code.as_deref(), Some("23505" | "42P07" | "42710")))
}

/// Runs `run`, making the tables first if they are missing.
fn with_schema<T>(mut run: impl FnMut() -> Result<T, SqlError>) -> Result<T, Refusal> {
    match run() {
        Err(error) if missing_table(&error) => {
            for statement in SCHEMA {
                // Another request may be making them at the same time: on PostgreSQL the
                // slower one's `IF NOT EXISTS` then fails once the faster one has committed,
                // and the table is there.
                match sql::execute(statement, &[]) {
                    Err(error) if !made_by_another(&error) => {
                        eprintln!("making the tables: {error:?}")
                    }
                    _ => {}
                }
            }
            run().map_err(refusal)
        }
        other => other.map_err(refusal),
    }
}

pub fn query(statement: &str, params: &[Value]) -> Result<Vec<Row>, Refusal> {
    let rows = with_schema(|| sql::query(statement, params))?;
    let columns = std::rc::Rc::new(rows.columns);
    Ok(rows
        .rows
        .into_iter()
        .map(|values| Row {
            columns: columns.clone(),
            values,
        })
        .collect())
}

pub fn query_one(statement: &str, params: &[Value]) -> Result<Option<Row>, Refusal> {
    Ok(query(statement, params)?.into_iter().next())
}

pub fn execute(statement: &str, params: &[Value]) -> Result<u64, Refusal> {
    with_schema(|| sql::execute(statement, params))
}

pub fn text(value: &str) -> Value {
    Value::Text(value.to_owned())
}
