//! `host:capabilities/sql` as a guest calls it, on the app's SQLite file (the default).

use std::time::Duration;

use tokio::time::Instant;
use wasmtime::component::Resource;

use super::{Fixture, MEMORY_LIMIT, app, apps, data_dir};
use crate::capabilities::host::capabilities::sql::{Host, HostTransaction, Rows, SqlError, Value};
use crate::capabilities::sql::OpenTransaction;

type Answer<T> = Result<T, SqlError>;

async fn query(fixture: &mut Fixture, statement: &str, params: Vec<Value>) -> Answer<Rows> {
    Host::query(&mut fixture.view(), statement.to_owned(), params)
        .await
        .expect("query does not trap")
}

async fn execute(fixture: &mut Fixture, statement: &str, params: Vec<Value>) -> Answer<u64> {
    Host::execute(&mut fixture.view(), statement.to_owned(), params)
        .await
        .expect("execute does not trap")
}

async fn begin(fixture: &mut Fixture) -> Answer<Resource<OpenTransaction>> {
    Host::begin(&mut fixture.view())
        .await
        .expect("begin does not trap")
}

/// The same resource again, as a guest passes a borrow of it to a method.
fn borrow(transaction: &Resource<OpenTransaction>) -> Resource<OpenTransaction> {
    Resource::new_borrow(transaction.rep())
}

async fn in_transaction(
    fixture: &mut Fixture,
    transaction: &Resource<OpenTransaction>,
    statement: &str,
    params: Vec<Value>,
) -> Answer<u64> {
    HostTransaction::execute(
        &mut fixture.view(),
        borrow(transaction),
        statement.to_owned(),
        params,
    )
    .await
    .expect("execute does not trap")
}

/// The integers of the first column, as a guest would read them.
fn integers(rows: &Rows) -> Vec<i64> {
    rows.rows
        .iter()
        .map(|row| match row.first() {
            Some(Value::Integer(number)) => *number,
            other => panic!("expected an integer, got {other:?}"),
        })
        .collect()
}

/// The SQLite result code a refusal carries (`database-error.code`).
fn database_code(refused: &Answer<impl std::fmt::Debug>) -> Option<&str> {
    match refused {
        Err(SqlError::Database(error)) => error.code.as_deref(),
        _ => None,
    }
}

#[tokio::test]
async fn statements_round_trip_values_through_positional_parameters() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "notes").await;
    execute(
        &mut fixture,
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, weight REAL, body TEXT, raw BLOB, extra TEXT, flag INTEGER)",
        vec![],
    )
    .await
    .expect("created");
    let inserted = execute(
        &mut fixture,
        "INSERT INTO notes (id, weight, body, raw, extra, flag) VALUES ($1, $2, $3, $4, $5, $6)",
        vec![
            Value::Integer(i64::MIN),
            Value::Real(2.5),
            Value::Text("héllo ✓".to_owned()),
            Value::Blob(vec![0, 1, 255]),
            Value::Null,
            Value::Boolean(true),
        ],
    )
    .await
    .expect("inserted");
    assert_eq!(inserted, 1);
    for id in [2, 3] {
        execute(
            &mut fixture,
            "INSERT INTO notes (id, body) VALUES ($1, $2)",
            vec![Value::Integer(id), Value::Text(format!("note {id}"))],
        )
        .await
        .expect("inserted");
    }
    let rows = query(
        &mut fixture,
        "SELECT id, weight, body, raw, extra, flag FROM notes WHERE body = $1",
        vec![Value::Text("héllo ✓".to_owned())],
    )
    .await
    .expect("selected");
    assert_eq!(
        rows.columns,
        ["id", "weight", "body", "raw", "extra", "flag"]
    );
    assert_eq!(rows.rows.len(), 1);
    let row = &rows.rows[0];
    assert!(matches!(row[0], Value::Integer(i64::MIN)), "{row:?}");
    assert!(
        matches!(row[1], Value::Real(weight) if weight == 2.5),
        "{row:?}"
    );
    assert!(
        matches!(&row[2], Value::Text(body) if body == "héllo ✓"),
        "{row:?}"
    );
    assert!(
        matches!(&row[3], Value::Blob(raw) if raw == &[0, 1, 255]),
        "{row:?}"
    );
    assert!(matches!(row[4], Value::Null), "{row:?}");
    // SQLite has no booleans: the WIT says it gives 1.
    assert!(matches!(row[5], Value::Integer(1)), "{row:?}");

    let changed = execute(
        &mut fixture,
        "UPDATE notes SET weight = $1 WHERE id > $2",
        vec![Value::Real(0.5), Value::Integer(1)],
    )
    .await
    .expect("updated");
    assert_eq!(changed, 2);
    let rows = query(&mut fixture, "SELECT id FROM notes ORDER BY id", vec![])
        .await
        .expect("selected");
    assert_eq!(integers(&rows), [i64::MIN, 2, 3]);
    // An empty result still answers.
    let none = query(&mut fixture, "SELECT id FROM notes WHERE id = 42", vec![])
        .await
        .expect("selected");
    assert!(none.rows.is_empty());
}

#[tokio::test]
async fn refused_statements_say_why() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "notes").await;
    execute(
        &mut fixture,
        "CREATE TABLE tags (name TEXT PRIMARY KEY)",
        vec![],
    )
    .await
    .expect("created");
    execute(
        &mut fixture,
        "INSERT INTO tags VALUES ($1)",
        vec![Value::Text("a".into())],
    )
    .await
    .expect("inserted");
    let duplicate = execute(
        &mut fixture,
        "INSERT INTO tags VALUES ($1)",
        vec![Value::Text("a".into())],
    )
    .await;
    // SQLITE_CONSTRAINT_PRIMARYKEY
    assert_eq!(database_code(&duplicate), Some("1555"), "{duplicate:?}");
    let syntax = query(&mut fixture, "SELEKT 1", vec![]).await;
    assert_eq!(database_code(&syntax), Some("1"), "{syntax:?}");
    let missing = query(&mut fixture, "SELECT * FROM nowhere", vec![]).await;
    assert!(
        matches!(&missing, Err(SqlError::Database(error)) if error.message.contains("no such table")),
        "{missing:?}"
    );
}

#[tokio::test]
async fn a_transaction_commits_or_rolls_back() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "ledger").await;
    execute(
        &mut fixture,
        "CREATE TABLE entries (amount INTEGER)",
        vec![],
    )
    .await
    .expect("created");

    let transaction = begin(&mut fixture).await.expect("begun");
    in_transaction(
        &mut fixture,
        &transaction,
        "INSERT INTO entries VALUES ($1)",
        vec![Value::Integer(10)],
    )
    .await
    .expect("inserted");
    let seen = HostTransaction::query(
        &mut fixture.view(),
        borrow(&transaction),
        "SELECT amount FROM entries".to_owned(),
        vec![],
    )
    .await
    .expect("query does not trap")
    .expect("selected");
    assert_eq!(integers(&seen), [10], "a transaction sees its own writes");
    HostTransaction::commit(&mut fixture.view(), borrow(&transaction))
        .await
        .expect("commit does not trap")
        .expect("committed");
    // Ended once: it takes no more statements.
    let finished = HostTransaction::commit(&mut fixture.view(), borrow(&transaction))
        .await
        .expect("commit does not trap");
    assert!(matches!(finished, Err(SqlError::TransactionFinished)));
    let finished = in_transaction(&mut fixture, &transaction, "SELECT 1", vec![]).await;
    assert!(matches!(finished, Err(SqlError::TransactionFinished)));
    HostTransaction::drop(&mut fixture.view(), transaction)
        .await
        .expect("dropped");

    let transaction = begin(&mut fixture).await.expect("begun");
    in_transaction(
        &mut fixture,
        &transaction,
        "INSERT INTO entries VALUES ($1)",
        vec![Value::Integer(20)],
    )
    .await
    .expect("inserted");
    HostTransaction::rollback(&mut fixture.view(), borrow(&transaction))
        .await
        .expect("rollback does not trap")
        .expect("rolled back");
    let finished = HostTransaction::rollback(&mut fixture.view(), borrow(&transaction))
        .await
        .expect("rollback does not trap");
    assert!(matches!(finished, Err(SqlError::TransactionFinished)));
    HostTransaction::drop(&mut fixture.view(), transaction)
        .await
        .expect("dropped");

    // Dropped without commit, a transaction is rolled back.
    let transaction = begin(&mut fixture).await.expect("begun");
    in_transaction(
        &mut fixture,
        &transaction,
        "INSERT INTO entries VALUES ($1)",
        vec![Value::Integer(30)],
    )
    .await
    .expect("inserted");
    HostTransaction::drop(&mut fixture.view(), transaction)
        .await
        .expect("dropped");

    let rows = query(&mut fixture, "SELECT amount FROM entries", vec![])
        .await
        .expect("selected");
    assert_eq!(integers(&rows), [10]);
    assert!(fixture.table.is_empty(), "no transaction is left open");
}

/// A statement that runs for seconds on SQLite, unless it is stopped.
const LONG_STATEMENT: &str = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000000) SELECT count(*) FROM n";

#[tokio::test]
async fn a_statement_past_its_deadline_is_stopped() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "slow").await;
    execute(&mut fixture, "CREATE TABLE numbers (i INTEGER)", vec![])
        .await
        .expect("created");
    // Each statement starts before its deadline (a second away, so a loaded machine still
    // starts it in time) and would run for many seconds past it.
    let soon = || Some(Instant::now() + Duration::from_secs(1));
    let started = std::time::Instant::now();
    fixture.bounds.deadline = soon();
    let stopped = query(&mut fixture, LONG_STATEMENT, vec![]).await;
    // SQLITE_INTERRUPT, as the database's own refusal.
    assert_eq!(database_code(&stopped), Some("9"), "{stopped:?}");
    fixture.bounds.deadline = soon();
    let stopped = execute(
        &mut fixture,
        "INSERT INTO numbers WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000000) SELECT i FROM n",
        vec![],
    )
    .await;
    assert_eq!(database_code(&stopped), Some("9"), "{stopped:?}");
    // Inside a transaction too.
    fixture.bounds.deadline = soon();
    let transaction = begin(&mut fixture).await.expect("begun");
    let stopped = HostTransaction::query(
        &mut fixture.view(),
        borrow(&transaction),
        LONG_STATEMENT.to_owned(),
        vec![],
    )
    .await
    .expect("query does not trap");
    assert_eq!(database_code(&stopped), Some("9"), "{stopped:?}");
    HostTransaction::drop(&mut fixture.view(), transaction)
        .await
        .expect("dropped");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "stopped only after {:?}",
        started.elapsed()
    );
    // Nothing of the interrupted insert was kept.
    fixture.bounds.deadline = Some(Instant::now() + Duration::from_secs(30));
    let rows = query(&mut fixture, "SELECT count(*) FROM numbers", vec![])
        .await
        .expect("counted");
    assert_eq!(integers(&rows), [0]);
}

/// A statement shorter than the progress handler's interval (1000 SQLite instructions) is never
/// interrupted by it: one begun after the deadline is refused before it runs.
#[tokio::test]
async fn a_short_statement_begun_past_its_deadline_is_refused() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "slow").await;
    execute(&mut fixture, "CREATE TABLE numbers (i INTEGER)", vec![])
        .await
        .expect("created");
    fixture.bounds.deadline = Some(Instant::now() - Duration::from_secs(10));
    let late = execute(
        &mut fixture,
        "INSERT INTO numbers VALUES ($1)",
        vec![Value::Integer(1)],
    )
    .await;
    fixture.bounds.deadline = None;
    let rows = query(&mut fixture, "SELECT count(*) FROM numbers", vec![])
        .await
        .expect("counted");
    assert!(late.is_err(), "the late insert answered {late:?}");
    assert_eq!(integers(&rows), [0], "the late insert was stored");
}

#[tokio::test]
async fn a_result_larger_than_the_instance_has_left_is_refused() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "big").await;
    execute(&mut fixture, "CREATE TABLE pages (body TEXT)", vec![])
        .await
        .expect("created");
    for _ in 0..100 {
        execute(
            &mut fixture,
            "INSERT INTO pages VALUES ($1)",
            vec![Value::Text("x".repeat(1000))],
        )
        .await
        .expect("inserted");
    }
    // 64 KiB of memory, 1 KiB of it in use: 63 KiB is left for the result.
    fixture.bounds.memory_limit = 64 << 10;
    fixture.bounds.instance_memory = 1 << 10;
    let left: u64 = 63 << 10;
    let refused = query(&mut fixture, "SELECT body FROM pages", vec![]).await;
    assert!(
        matches!(refused, Err(SqlError::TooLarge(limit)) if limit == left),
        "{refused:?}"
    );
    // A page of it fits.
    let page = query(&mut fixture, "SELECT body FROM pages LIMIT 10", vec![])
        .await
        .expect("ten rows fit");
    assert_eq!(page.rows.len(), 10);
    // The same bound holds in a transaction.
    let transaction = begin(&mut fixture).await.expect("begun");
    let refused = HostTransaction::query(
        &mut fixture.view(),
        borrow(&transaction),
        "SELECT body FROM pages".to_owned(),
        vec![],
    )
    .await
    .expect("query does not trap");
    assert!(matches!(refused, Err(SqlError::TooLarge(_))), "{refused:?}");
    HostTransaction::drop(&mut fixture.view(), transaction)
        .await
        .expect("dropped");
    // An instance at (or past) its limit has room for no row at all.
    fixture.bounds.instance_memory = 64 << 10;
    let refused = query(&mut fixture, "SELECT 1", vec![]).await;
    assert!(matches!(refused, Err(SqlError::TooLarge(0))), "{refused:?}");
    // Statements that return no rows still run.
    let changed = execute(&mut fixture, "DELETE FROM pages", vec![])
        .await
        .expect("deleted");
    assert_eq!(changed, 100);
}

#[tokio::test]
async fn a_value_longer_than_half_the_memory_limit_is_refused() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "big").await;
    let half = MEMORY_LIMIT / 2;
    let fits = query(
        &mut fixture,
        "SELECT length(zeroblob($1))",
        vec![Value::Integer(half as i64)],
    )
    .await
    .expect("half the memory limit is a value");
    assert_eq!(integers(&fits), [half as i64]);
    let refused = query(
        &mut fixture,
        "SELECT length(zeroblob($1))",
        vec![Value::Integer(half as i64 + 1)],
    )
    .await;
    // SQLITE_TOOBIG
    assert_eq!(database_code(&refused), Some("18"), "{refused:?}");
}

#[tokio::test]
async fn an_app_reaches_only_its_own_database() {
    let dir = data_dir();
    let [mut first, mut second] = apps(dir.path(), ["first", "second"]).await;
    execute(&mut first, "CREATE TABLE secrets (value TEXT)", vec![])
        .await
        .expect("created");
    execute(
        &mut first,
        "INSERT INTO secrets VALUES ($1)",
        vec![Value::Text("first's".into())],
    )
    .await
    .expect("inserted");

    let unseen = query(&mut second, "SELECT value FROM secrets", vec![]).await;
    assert!(
        matches!(&unseen, Err(SqlError::Database(error)) if error.message.contains("no such table")),
        "{unseen:?}"
    );
    let tables = query(
        &mut second,
        "SELECT name FROM sqlite_schema WHERE type = 'table'",
        vec![],
    )
    .await
    .expect("listed");
    assert!(tables.rows.is_empty(), "{tables:?}");
    // Nor by attaching the other app's file, or the host's own tables.
    for file in [
        dir.path().join("apps/first/app.sqlite"),
        dir.path().join("host.sqlite"),
    ] {
        let refused = execute(
            &mut second,
            "ATTACH DATABASE $1 AS other",
            vec![Value::Text(file.display().to_string())],
        )
        .await;
        assert!(
            matches!(refused, Err(SqlError::Database(_))),
            "{}: {refused:?}",
            file.display()
        );
    }
    // Its own table of the same name is its own.
    execute(&mut second, "CREATE TABLE secrets (value TEXT)", vec![])
        .await
        .expect("created");
    execute(&mut second, "DROP TABLE secrets", vec![])
        .await
        .expect("dropped");
    let rows = query(&mut first, "SELECT value FROM secrets", vec![])
        .await
        .expect("still there");
    assert!(matches!(&rows.rows[0][0], Value::Text(value) if value == "first's"));
}

/// The app's file is in write-ahead-log mode before its pool connects, so another connection
/// reading it holds no statement up. Before, each pool connection switched the new file as it
/// opened, a switch SQLite's busy timeout does not wait for: beside a reader, every connection
/// failed to open and the app's statements were refused as "unavailable" for 30 s; beside the
/// pool's own connections opening at once (the first requests of a fresh data directory), one
/// could fail with `database is locked`.
#[tokio::test]
async fn the_first_statements_on_a_new_file_are_not_refused_while_it_is_read() {
    use sqlx::{Connection, Executor};

    let dir = data_dir();
    let mut fixture = app(dir.path(), "first").await;
    let file = dir.path().join("apps/first/app.sqlite");
    let mut reader = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
        .await
        .expect("a reader connects");
    reader
        .execute("BEGIN; SELECT count(*) FROM sqlite_schema")
        .await
        .expect("the reader holds the file");

    for statement in [
        "CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY)",
        "INSERT INTO users DEFAULT VALUES",
    ] {
        execute(&mut fixture, statement, vec![])
            .await
            .unwrap_or_else(|refused| panic!("{statement}: {refused:?}"));
    }
    reader.execute("COMMIT").await.expect("the reader ends");
}
