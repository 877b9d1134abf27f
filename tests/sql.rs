//! SQL through a real guest on SQLite and on the machine's PostgreSQL: the same statements with
//! positional parameters and common types on both, typed errors with the database's own code
//! and message, transactions, and an outage that fails requests with `unavailable` while the
//! host keeps serving, and is over when the database is back.

use blackbox::{AppHost, Backends, Relay, RelayMode, Services, database_addr, database_url_via};
use serde_json::json;

async fn same_statements_on_both(backends: Backends) {
    let mut services = Services::start(backends);
    let probe = AppHost::start(&mut services, "probe", "sql", &["--workers", "2"]);
    let (status, answer) = probe.sql("execute",
        "CREATE TABLE notes (id BIGINT PRIMARY KEY, title TEXT NOT NULL, body BYTEA, score DOUBLE PRECISION, done BOOLEAN)",
        json!([]),
    )
    .await;
    // SQLite takes PostgreSQL's type names (it keeps the values' own types).
    assert_eq!(status, 200, "{answer}");
    let insert = "INSERT INTO notes (id, title, body, score, done) VALUES ($1, $2, $3, $4, $5)";
    for params in [
        json!([1, "first", {"blob": "00ff10"}, 2.5, true]),
        json!([2, "second", null, null, null]),
        json!([3, "thïrd 'quoted'", {"blob": ""}, -1e10, false]),
    ] {
        let (status, answer) = probe.sql("execute", insert, params).await;
        assert_eq!(
            (status, &answer["rows_affected"]),
            (200, &json!(1)),
            "{answer}"
        );
    }
    // Parameters out of order and repeated.
    let (status, rows) = probe.sql("query",
        "SELECT id, title, body, score FROM notes WHERE id >= $2 AND title <> $1 AND id <= $2 + 10 ORDER BY id",
        json!(["second", 1]),
    )
    .await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows["columns"], json!(["id", "title", "body", "score"]));
    assert_eq!(
        rows["rows"],
        json!([[1, "first", {"blob": "00ff10"}, 2.5], [3, "thïrd 'quoted'", {"blob": ""}, -1e10]])
    );
    // Booleans are booleans on PostgreSQL, 0 and 1 on SQLite.
    let (_, done) = probe
        .sql("query", "SELECT done FROM notes WHERE id = $1", json!([1]))
        .await;
    let expected = if backends == Backends::PostgresS3 {
        json!(true)
    } else {
        json!(1)
    };
    assert_eq!(done["rows"][0][0], expected, "{done}");

    // Typed errors, with the database's code and message.
    let (status, answer) = probe
        .sql("execute", insert, json!([1, "again", null, null, null]))
        .await;
    assert_eq!(status, 400, "{answer}");
    let code = answer["error"]["code"].as_str().unwrap_or_default();
    let expected_code = if backends == Backends::PostgresS3 {
        "23505"
    } else {
        "1555"
    };
    assert_eq!(code, expected_code, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("unique"),
        "{answer}"
    );
    let (status, answer) = probe.sql("query", "SELEC 1", json!([])).await;
    assert_eq!(
        (status, answer["error"]["kind"].as_str()),
        (400, Some("database")),
        "{answer}"
    );

    // A transaction rolled back leaves nothing; committed, it stays.
    let steps = json!([
        {"statement": "INSERT INTO notes (id, title) VALUES ($1, $2) RETURNING id", "params": [10, "ten"]},
        {"statement": "SELECT count(*) AS n FROM notes", "params": []},
    ])
    .to_string();
    let (status, inside) = probe.call("POST", "/sql/transaction", steps.clone()).await;
    assert_eq!(status, 200, "{inside}");
    assert_eq!(
        inside[1]["rows"][0][0],
        json!(4),
        "the transaction sees its own insert"
    );
    let (_, count) = probe
        .sql("query", "SELECT count(*) FROM notes", json!([]))
        .await;
    assert_eq!(count["rows"][0][0], json!(3), "a rolled-back insert stayed");
    let (status, _) = probe
        .call("POST", "/sql/transaction?commit=true", steps)
        .await;
    assert_eq!(status, 200);
    let (_, count) = probe
        .sql("query", "SELECT count(*) FROM notes", json!([]))
        .await;
    assert_eq!(
        count["rows"][0][0],
        json!(4),
        "a committed insert is missing"
    );
    // A failing statement fails the transaction, which is rolled back when dropped.
    let failing = json!([
        {"statement": "INSERT INTO notes (id, title) VALUES ($1, $2)", "params": [11, "eleven"]},
        {"statement": "INSERT INTO notes (id, title) VALUES ($1, $2)", "params": [11, "again"]},
    ])
    .to_string();
    let (status, _) = probe
        .call("POST", "/sql/transaction?commit=true", failing)
        .await;
    assert_eq!(status, 400);
    let (_, count) = probe
        .sql(
            "query",
            "SELECT count(*) FROM notes WHERE id = 11",
            json!([]),
        )
        .await;
    assert_eq!(
        count["rows"][0][0],
        json!(0),
        "half a failed transaction stayed"
    );
}

#[tokio::test]
async fn the_same_statements_run_on_sqlite() {
    same_statements_on_both(Backends::SqliteLocal).await;
}

#[tokio::test]
async fn the_same_statements_run_on_postgres() {
    same_statements_on_both(Backends::PostgresS3).await;
}

#[tokio::test]
async fn postgres_types_outside_the_interface_say_how_to_cast() {
    let mut services = Services::start(Backends::PostgresS3);
    let probe = AppHost::start(&mut services, "probe", "types", &[]);
    let (status, answer) = probe.sql("query", "SELECT now() AS at", json!([])).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["kind"]
            .as_str()
            .unwrap()
            .contains("at::text"),
        "{answer}"
    );
    let (status, answer) = probe
        .sql(
            "query",
            "SELECT now()::text AS at, 1.5::numeric::float8 AS n",
            json!([]),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn a_database_outage_fails_requests_with_unavailable_and_passes() {
    let relay = Relay::start(database_addr(), RelayMode::Forward);
    let url = database_url_via(relay.addr);
    let mut services = Services::start(Backends::SqliteLocal);
    let probe = AppHost::start(
        &mut services,
        "probe",
        "outage",
        &["--database-url", &url, "--database-timeout", "2"],
    );
    blackbox::drop_postgres_app(&probe.app.app);
    let (status, answer) = probe
        .sql("execute", "CREATE TABLE t (id BIGINT)", json!([]))
        .await;
    assert_eq!(status, 200, "{answer}");

    relay.cut();
    let started = std::time::Instant::now();
    let (status, answer) = probe
        .sql("query", "SELECT count(*) FROM t", json!([]))
        .await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"]["kind"]
            .as_str()
            .unwrap()
            .contains("Unavailable"),
        "{answer}"
    );
    assert!(
        started.elapsed().as_secs() < 10,
        "the outage answer took {:?}",
        started.elapsed()
    );
    // The host keeps serving what does not need the database.
    let (status, _) = probe.call("PUT", "/objects/put?key=still", "here").await;
    assert_eq!(status, 200);

    relay.resume();
    let (status, answer) = probe
        .sql("query", "SELECT count(*) FROM t", json!([]))
        .await;
    assert_eq!(status, 200, "after the outage: {answer}");
    blackbox::drop_postgres_app(&probe.app.app);
}

/// A statement whose connection the server ends (what a PostgreSQL restart does: SQLSTATE
/// 57P01) fails as `unavailable`, which apps answer 503 and clients retry, not as a refusal of
/// the statement; the next one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_server_ends_mid_statement_is_unavailable_not_refused() {
    let mut services = Services::start(Backends::PostgresS3);
    let probe = AppHost::start(&mut services, "probe", "terminated", &[]);
    let app = probe.app.app.to_ascii_lowercase();
    let sleeping = probe.sql("query", "SELECT pg_sleep(20)::text AS slept", json!([]));
    let terminate = tokio::task::spawn_blocking(move || {
        let ended = blackbox::poll_until(
            std::time::Duration::from_secs(10),
            std::time::Duration::from_millis(50),
            || {
                let ended = blackbox::psql(&format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE usename LIKE 'host\\_app\\_{app}\\_%' AND query LIKE '%pg_sleep%'"
                ));
                (ended != "0").then_some(())
            },
        );
        assert!(ended.is_some(), "the statement never reached PostgreSQL");
    });
    let ((status, answer), terminated) = futures::join!(sleeping, terminate);
    terminated.unwrap();
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"]["kind"]
            .as_str()
            .unwrap_or_default()
            .contains("Unavailable"),
        "{answer}"
    );
    let (status, answer) = probe.sql("query", "SELECT 1 AS one", json!([])).await;
    assert_eq!(status, 200, "{answer}");
    blackbox::drop_postgres_app(&probe.app.app);
}
