//! The host's own SQLite database after a write it could not make.

use std::time::Duration;

use sqlx::Executor;

use super::data_dir;
use crate::capabilities::database::{self, Backend, BackendKind, HostDatabase};

const ENTRY: &str =
    "INSERT INTO hmac_entries (app, name, key_id, touched) VALUES ('app', $1, 'key', 0)";

#[tokio::test]
async fn a_full_disk_leaves_no_connection_stuck_in_a_transaction() {
    let dir = data_dir();
    let backend = Backend {
        kind: BackendKind::Sqlite(dir.path().to_path_buf()),
        acquire_timeout: Duration::from_secs(5),
    };
    let database = HostDatabase::new(&backend)
        .await
        .expect("the database opens");

    // The file may not grow: a write that needs a new page fails as on a full disk, and SQLite
    // then rolls the whole transaction back itself.
    let mut transaction = database.begin_write().await.expect("a transaction begins");
    transaction
        .execute("PRAGMA max_page_count = 1")
        .await
        .expect("the page count is capped");
    let full = sqlx::query(ENTRY)
        .bind("x".repeat(64 << 10))
        .execute(&mut *transaction)
        .await
        .expect_err("the file cannot grow");
    assert!(
        database::is_unavailable(&full),
        "a full disk is an outage: {full}"
    );
    drop(transaction);

    // Once space is back (here: a connection without the cap), every later write succeeds, on
    // whichever connection the pool hands out.
    for attempt in 0..4 {
        let mut transaction = database
            .begin_write()
            .await
            .unwrap_or_else(|error| panic!("write {attempt} after the full disk begins: {error}"));
        sqlx::query(ENTRY)
            .bind(format!("entry {attempt}"))
            .execute(&mut *transaction)
            .await
            .unwrap_or_else(|error| panic!("write {attempt} after the full disk: {error}"));
        transaction
            .commit()
            .await
            .unwrap_or_else(|error| panic!("write {attempt} after the full disk commits: {error}"));
    }
}
