//! What one app's SQL can make the host and the database spend, tried by a hostile app next to
//! a victim app in one host, on SQLite and on the machine's PostgreSQL: a statement stops at
//! its request's deadline and burns nothing after it, SQLite's memory in the host stays near
//! the app's `--memory-limit`, PRAGMAs that change the process are refused, and on PostgreSQL a
//! session's locks and settings end with its request and no app can stall the host's set-up.

use std::time::{Duration, Instant};

use blackbox::{
    HostProcess, database_url, drop_postgres_app, fuzzing, guest, http_client, poll_until, psql,
};
use proptest::prelude::*;
use serde_json::{Value, json};

/// A hostile and a victim copy of the probe guest in one host, on SQLite files or on the
/// tests' PostgreSQL; the apps' PostgreSQL schemas and roles are removed when it is dropped.
struct TwoApps {
    host: HostProcess,
    postgres: bool,
    hostile: String,
    victim: String,
    _dir: tempfile::TempDir,
}

impl TwoApps {
    /// `hostile` settings (TOML lines of its `[[app]]`) and the host's `args`.
    fn start(postgres: bool, hostile_settings: &str, args: &[&str]) -> TwoApps {
        let hostile = blackbox::unique_name("hostile");
        let victim = blackbox::unique_name("victim");
        if postgres {
            drop_postgres_app(&hostile);
            drop_postgres_app(&victim);
        }
        let config = format!(
            r#"
worker_class = "gthread"
threads = 4

[[app]]
name = "{hostile}"
component = "{probe}"
hosts = ["{hostile}.test"]
{hostile_settings}

[[app]]
name = "{victim}"
component = "{probe}"
hosts = ["{victim}.test"]
"#,
            probe = guest("probe"),
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("host.toml");
        std::fs::write(&path, config).expect("write the config");
        let url = database_url();
        let mut all_args = args.to_vec();
        if postgres {
            all_args.extend(["--database-url", &url, "--database-timeout", "5"]);
        }
        TwoApps {
            host: HostProcess::start_with_config(&path, &all_args),
            postgres,
            hostile,
            victim,
            _dir: dir,
        }
    }

    /// `statement` through the probe's `/sql/<route>` of `app` (`hostile` or `victim`): the
    /// status, the JSON answer and how long it took.
    async fn sql(&self, app: &str, route: &str, statement: &str) -> (u16, Value, Duration) {
        let body = json!({"statement": statement, "params": []}).to_string();
        self.call(app, "POST", &format!("/sql/{route}"), body).await
    }

    /// `method path` with `body` to `app`: the status, the JSON answer and how long it took.
    async fn call(
        &self,
        app: &str,
        method: &str,
        path: &str,
        body: String,
    ) -> (u16, Value, Duration) {
        let started = Instant::now();
        let response = http_client()
            .request(method.parse().expect("a method"), self.host.url(path))
            .header("host", format!("{app}.test"))
            .body(body)
            .send()
            .await
            .expect("the host answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, json, started.elapsed())
    }

    /// The hostile app's role on PostgreSQL.
    fn hostile_role(&self) -> String {
        psql(&format!(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'host\\_app\\_{}\\_%'",
            self.hostile
        ))
    }
}

impl Drop for TwoApps {
    fn drop(&mut self) {
        if self.postgres {
            drop_postgres_app(&self.hostile);
            drop_postgres_app(&self.victim);
        }
    }
}

/// A statement that computes for a long time, and one that waits for a long time.
fn runaway_statement(postgres: bool) -> &'static str {
    if postgres {
        "SELECT pg_sleep(12)"
    } else {
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 500000000) \
         SELECT count(*) FROM c"
    }
}

async fn a_runaway_statement_stops_at_the_deadline(postgres: bool) {
    let apps = TwoApps::start(postgres, "threads = 1", &["--timeout", "3"]);
    for app in [&apps.hostile, &apps.victim] {
        let (status, answer, _) = apps.sql(app, "query", "SELECT 1").await;
        assert_eq!(status, 200, "{answer}");
    }
    let runaway = apps.sql(&apps.hostile, "query", runaway_statement(postgres));
    // The victim answers while the hostile statement runs.
    let victim = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        apps.sql(&apps.victim, "query", "SELECT 2").await
    };
    let ((status, answer, took), (victim_status, _, victim_took)) = tokio::join!(runaway, victim);
    assert_eq!(status, 504, "{answer}");
    assert!(took < Duration::from_secs(8), "the 504 took {took:?}");
    assert_eq!(victim_status, 200);
    assert!(
        victim_took < Duration::from_secs(2),
        "the victim waited {victim_took:?} beside the runaway statement"
    );

    // Nothing keeps running after the deadline: the worker's CPU, and the database's backend.
    let cpu_before = apps.host.cpu_time();
    let window = Instant::now();
    if postgres {
        let role = apps.hostile_role();
        let stopped = poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
            psql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' AND state = 'active'"
            ))
            .eq("0")
            .then_some(())
        });
        assert!(
            stopped.is_some(),
            "the hostile statement still runs on PostgreSQL after its deadline: {}",
            psql(&format!(
                "SELECT state, query FROM pg_stat_activity WHERE usename = '{role}'"
            ))
        );
    }
    // A statement left running burns a core (0.4 s a second even on this loaded machine);
    // an idle host a few milliseconds.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(window.elapsed())).await;
    let burnt = apps.host.cpu_time().saturating_sub(cpu_before);
    assert!(
        burnt < Duration::from_millis(300),
        "the host burnt {burnt:?} of CPU in the 3 s after the deadline"
    );

    // The app's next statements get a connection that is not busy with the old one.
    for app in [&apps.hostile, &apps.victim] {
        let (status, answer, took) = apps.sql(app, "query", "SELECT 3").await;
        assert_eq!(status, 200, "{app}: {answer}");
        assert!(took < Duration::from_secs(2), "{app} waited {took:?}");
    }
}

#[tokio::test]
async fn a_runaway_sqlite_statement_stops_at_the_deadline() {
    a_runaway_statement_stops_at_the_deadline(false).await;
}

#[tokio::test]
async fn a_runaway_postgres_statement_stops_at_the_deadline() {
    a_runaway_statement_stops_at_the_deadline(true).await;
}

#[tokio::test]
async fn sqlite_memory_in_the_host_stays_within_what_the_budget_counts() {
    // Both apps at 16 MiB: SQLite makes no value longer than 8 MiB for them, and holds at most
    // 2 × (2 × 8 MiB + 4 × 1 MiB) + 2 MiB in the worker.
    let apps = TwoApps::start(false, "", &["--memory-limit", "16MiB"]);
    let (status, _, _) = apps.sql(&apps.victim, "query", "SELECT 1").await;
    assert_eq!(status, 200);
    let idle = apps.host.rss_kib();
    let wide_row = format!("SELECT {}", ["randomblob(8000000)"; 60].join(", "));
    for (statement, refusal) in [
        ("SELECT length(randomblob(400000000))", "too big"),
        ("SELECT zeroblob(300000000)", "too big"),
        (wide_row.as_str(), "out of memory"),
    ] {
        let (status, answer, _) = apps.sql(&apps.hostile, "query", statement).await;
        let shown = &statement[..statement.len().min(60)];
        assert_eq!(status, 400, "{shown}: {answer}");
        assert_eq!(answer["error"]["kind"], "database", "{shown}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(refusal),
            "{shown}: {answer}"
        );
        let grown = apps.host.rss_kib().saturating_sub(idle);
        assert!(
            grown < 96 * 1024,
            "{shown} took the host from {idle} KiB to {} KiB",
            idle + grown
        );
    }
    // Within the limits is fine, and the victim is unaffected.
    let (status, answer, _) = apps
        .sql(
            &apps.hostile,
            "query",
            "SELECT length(replace(hex(zeroblob(3500000)), '0', 'a'))",
        )
        .await;
    assert_eq!(
        (status, &answer["rows"]),
        (200, &json!([[7000000]])),
        "{answer}"
    );
    let (status, answer, _) = apps
        .sql(&apps.victim, "query", "SELECT length(randomblob(4000000))")
        .await;
    assert_eq!(
        (status, &answer["rows"]),
        (200, &json!([[4000000]])),
        "{answer}"
    );
}

#[tokio::test]
async fn sqlite_pragmas_that_change_the_process_are_refused() {
    let apps = TwoApps::start(false, "", &[]);
    let (status, answer, _) = apps
        .sql(&apps.victim, "execute", "CREATE TABLE t (v TEXT)")
        .await;
    assert_eq!(status, 200, "{answer}");
    for statement in [
        "PRAGMA hard_heap_limit = 100000",
        "PRAGMA soft_heap_limit = 100000",
        "SELECT * FROM pragma_hard_heap_limit",
        "PRAGMA temp_store_directory = '/tmp'",
        "PRAGMA temp_store_directory",
        "PRAGMA cache_size = -1000000",
        "PRAGMA journal_mode = OFF",
        "PRAGMA writable_schema = ON",
        "PRAGMA threads = 8",
        "PRAGMA mmap_size = 1000000000",
    ] {
        let (status, answer, _) = apps.sql(&apps.hostile, "query", statement).await;
        assert_eq!(status, 400, "{statement}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("not authorized"),
            "{statement}: {answer}"
        );
    }
    // What only reads the app's own schema, or sets its own file's fields, still works.
    for statement in [
        "PRAGMA user_version = 7",
        "PRAGMA user_version",
        "PRAGMA table_info(t)",
        "SELECT name FROM pragma_table_list",
        "PRAGMA integrity_check",
        "PRAGMA journal_mode",
    ] {
        let (status, answer, _) = apps.sql(&apps.hostile, "query", statement).await;
        assert_eq!(status, 200, "{statement}: {answer}");
    }
    // The victim's SQL and the host's own tables (the registry) are unaffected.
    let (status, answer, _) = apps
        .sql(
            &apps.victim,
            "execute",
            "INSERT INTO t VALUES (hex(randomblob(100000)))",
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, key, _) = apps
        .call(&apps.victim, "GET", "/crypto/key", String::new())
        .await;
    assert_eq!(status, 200, "{key}");
    let key_id = key["key_id"].as_str().expect("a key id");
    let (status, answer, _) = apps
        .call(
            &apps.victim,
            "POST",
            &format!("/registry/begin?name=entry&key_id={key_id}"),
            String::new(),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn a_postgres_session_ends_with_its_request_and_no_app_stalls_the_set_up() {
    let apps = TwoApps::start(true, "threads = 1", &["--timeout", "20"]);
    let (status, answer, _) = apps.sql(&apps.hostile, "query", "SELECT 1").await;
    assert_eq!(status, 200, "{answer}");
    let role = apps.hostile_role();

    // The role is held to a connection limit and to timeouts of its own.
    let limit: i64 = psql(&format!(
        "SELECT rolconnlimit FROM pg_roles WHERE rolname = '{role}'"
    ))
    .parse()
    .expect("a connection limit");
    assert!(limit > 0, "the app role has no connection limit");
    let config = psql(&format!(
        "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting \
         JOIN pg_roles ON pg_roles.oid = setrole WHERE rolname = '{role}'"
    ));
    for setting in [
        "statement_timeout=20000ms",
        "lock_timeout=20000ms",
        "idle_in_transaction_session_timeout=20000ms",
    ] {
        assert!(config.contains(setting), "{setting} missing from {config}");
    }

    // A session's settings, LISTENs and locks do not outlive the request that made them.
    for statement in [
        "SELECT set_config('application_name', 'leaked', false)",
        "LISTEN hostile_channel",
        "SELECT pg_advisory_lock(7283491624)",
    ] {
        let (status, answer, _) = apps.sql(&apps.hostile, "execute", statement).await;
        assert_eq!(status, 200, "{statement}: {answer}");
    }
    let (status, answer, _) = apps
        .sql(
            &apps.hostile,
            "query",
            "SELECT current_setting('application_name'), \
             (SELECT count(*) FROM pg_listening_channels()), \
             (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())",
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rows"], json!([["", 0, 0]]), "{answer}");

    // An app holding what used to be the host's set-up lock, in a transaction that stays
    // open, does not stall the set-up of another app (its first statement).
    let holder = apps.call(
        &apps.hostile,
        "POST",
        "/sql/transaction",
        json!([
            {"statement": "SELECT pg_advisory_lock(7283491624)::text", "params": []},
            {"statement": "SELECT pg_advisory_lock(7283491623)::text", "params": []},
            {"statement": "SELECT pg_sleep(8)::text", "params": []},
        ])
        .to_string(),
    );
    let newcomer = async {
        // Polled without blocking the thread the hostile request runs on.
        let started = Instant::now();
        while psql(&format!(
            "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) \
             WHERE locktype = 'advisory' AND usename = '{role}'"
        )) != "2"
        {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the hostile app never held the locks"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        apps.sql(&apps.victim, "query", "SELECT 1").await
    };
    let ((holder_status, holder_answer, _), (status, answer, took)) =
        tokio::join!(holder, newcomer);
    assert_eq!(holder_status, 200, "{holder_answer}");
    assert_eq!(status, 200, "{answer}");
    assert!(
        took < Duration::from_secs(4),
        "the new app's first statement waited {took:?} for the hostile app's lock"
    );
}

/// A PostgreSQL row arrives whole in the driver's buffer before the host sees it, so a
/// statement that makes one large value (`repeat`, up to 1 GB) costs the worker that much while
/// it is read, however small the app's `--memory-limit`. Open: sqlx has no bound on a message's
/// size; what the fuzz target found is kept here until the host can refuse it before reading.
#[tokio::test]
#[ignore = "open: a PostgreSQL value is read whole before its size is checked"]
async fn a_large_postgres_value_is_refused_before_it_is_read() {
    let apps = TwoApps::start(true, "", &["--memory-limit", "16MiB"]);
    let (status, _, _) = apps.sql(&apps.victim, "query", "SELECT 1").await;
    assert_eq!(status, 200);
    let idle = apps.host.rss_kib();
    let (status, answer, _) = apps
        .sql(&apps.hostile, "query", "SELECT repeat('x', 200000000)")
        .await;
    let grown = apps.host.rss_kib().saturating_sub(idle);
    println!("a 200 MB value: {status}, the host grew by {grown} KiB");
    assert_eq!(status, 400, "{answer}");
    assert!(
        grown < 64 * 1024,
        "a 200 MB value took the host from {idle} KiB by {grown} KiB"
    );
}

/// A statement that returns rows as fast as the database makes them: they pile up in the
/// host's socket faster than they are read, and reading them must not hold the worker's event
/// loop past the request's deadline (its heartbeat stops with it, and the master kills the
/// worker with every other app's requests).
async fn a_flood_of_rows_stops_at_the_deadline_and_the_worker_lives(postgres: bool) {
    let apps = TwoApps::start(postgres, "", &["--timeout", "1"]);
    let flood = if postgres {
        "SELECT generate_series(1, 100000000)"
    } else {
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"
    };
    for route in ["execute", "query", "execute"] {
        let (status, answer, took) = apps.sql(&apps.hostile, route, flood).await;
        assert!(
            [400, 504].contains(&status),
            "{route} of a flood of rows: {status} {answer}"
        );
        assert!(
            took < Duration::from_secs(3),
            "{route} answered after {took:?}"
        );
        let (status, answer, took) = apps.sql(&apps.victim, "query", "SELECT 1").await;
        assert_eq!(status, 200, "the victim after the flood: {answer}");
        assert!(took < Duration::from_secs(2), "the victim waited {took:?}");
    }
    let log = apps.host.log();
    assert!(
        !log.contains("WORKER TIMEOUT") && !log.contains("exited with code"),
        "a flood of rows stalled the worker:\n{log}"
    );
}

#[tokio::test]
async fn a_flood_of_postgres_rows_stops_at_the_deadline_and_the_worker_lives() {
    a_flood_of_rows_stops_at_the_deadline_and_the_worker_lives(true).await;
}

#[tokio::test]
async fn a_flood_of_sqlite_rows_stops_at_the_deadline_and_the_worker_lives() {
    a_flood_of_rows_stops_at_the_deadline_and_the_worker_lives(false).await;
}

/// Statements a hostile app may send: memory, time and process-wide state, as a grammar of
/// fragments with `?` parameters of any type and size.
fn hostile_statement(postgres: bool) -> impl Strategy<Value = (String, Vec<Value>)> {
    let statements: Vec<&'static str> = if postgres {
        vec![
            "SELECT $1::text",
            // A large value returned whole is the open case of
            // `a_large_postgres_value_is_refused_before_it_is_read`; made and measured inside
            // the database, it is bounded.
            "SELECT length(repeat('x', $1::int))",
            "SELECT pg_sleep($1::float / 1000)",
            "SELECT pg_advisory_lock($1::bigint)",
            "SELECT set_config('statement_timeout', $1::text, false)",
            "SET lock_timeout = 0",
            "LISTEN x",
            "NOTIFY x",
            "SELECT lo_create(0)",
            "SELECT generate_series(1, $1::int)",
            "SELECT count(*) FROM generate_series(1, $1::bigint)",
            "SELECT * FROM pg_stat_activity",
            "CREATE TABLE IF NOT EXISTS f(a text)",
            "INSERT INTO f VALUES ($1::text)",
            "SELECT * FROM f",
            "SELECT 1; SELECT 2",
            "SELECT $1, $2",
            "DO $$ BEGIN LOOP END LOOP; END $$",
        ]
    } else {
        vec![
            "SELECT ?",
            "SELECT length(randomblob(?))",
            "SELECT zeroblob(?)",
            "SELECT printf('%.*c', ?, 'x')",
            "SELECT length(replace(hex(zeroblob(?)), '0', 'ab'))",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) SELECT count(*) FROM c",
            "PRAGMA hard_heap_limit = ?",
            "PRAGMA soft_heap_limit = ?",
            "PRAGMA temp_store_directory = '/tmp'",
            "PRAGMA cache_size = ?",
            "PRAGMA mmap_size = ?",
            "PRAGMA journal_mode = OFF",
            "PRAGMA writable_schema = 1",
            "ATTACH DATABASE ? AS other",
            "VACUUM INTO '/tmp/fuzz-sql.db'",
            "SELECT load_extension(?)",
            "CREATE TABLE IF NOT EXISTS f(a)",
            "INSERT INTO f VALUES (?)",
            "SELECT * FROM f",
            "SELECT group_concat(a) FROM f",
            "SELECT 1; SELECT 2",
            "SELECT ?, ?",
            "BEGIN",
            "COMMIT",
        ]
    };
    let parameter = prop_oneof![
        4 => prop_oneof![
            Just(0i64), Just(-1), Just(1_000), Just(100_000_000), Just(i64::MAX), Just(i64::MIN),
            any::<i64>(),
        ]
        .prop_map(|n| json!(n)),
        1 => any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        1 => any::<String>().prop_map(|s| json!(s)),
        // The probe takes JSON bodies up to 1 MiB.
        1 => (0usize..400_000).prop_map(|n| json!("s".repeat(n))),
        1 => prop::collection::vec(any::<u8>(), 0..32).prop_map(|b| json!({"blob": hex::encode(b)})),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(|b| json!(b)),
    ];
    (
        prop::sample::select(statements),
        prop_oneof![8 => Just(String::new()), 1 => any::<String>()],
        prop::collection::vec(parameter, 0..3),
    )
        .prop_map(|(statement, garbage, params)| (format!("{statement}{garbage}"), params))
}

/// Any statement a hostile app sends gets an answer (rows, a typed refusal, or 504 at its
/// deadline), never a trap or a lost worker, and its neighbour is answered at once after it.
fn any_statement_leaves_the_neighbour_served(postgres: bool, cases: u32) {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let apps = TwoApps::start(
        postgres,
        "",
        // 2 s rather than 1: the master also takes a worker silent for --timeout as stuck, and
        // on a loaded machine a worker can wait a second for a core.
        &[
            "--timeout",
            "2",
            "--memory-limit",
            "16MiB",
            "--keep-alive",
            "30",
        ],
    );
    let idle = runtime.block_on(async {
        let (status, answer, _) = apps.sql(&apps.victim, "query", "SELECT 1").await;
        assert_eq!(status, 200, "{answer}");
        apps.host.rss_kib()
    });
    let name = if postgres {
        "sql_statements_postgres"
    } else {
        "sql_statements_sqlite"
    };
    fuzzing::run(
        name,
        cases,
        hostile_statement(postgres),
        |(statement, params)| {
            runtime.block_on(async {
                let body = json!({"statement": statement, "params": params}).to_string();
                let shown: String = statement.chars().take(80).collect();
                for route in ["query", "execute"] {
                    let (status, answer, _) = apps
                        .call(
                            &apps.hostile,
                            "POST",
                            &format!("/sql/{route}"),
                            body.clone(),
                        )
                        .await;
                    // A result may fit the host's check and still not fit the app's memory
                    // with what it does with it: then the app hit its own cap.
                    let own_cap = status == 500
                        && answer
                            .as_str()
                            .is_some_and(|text| text.starts_with("memory limit exceeded"));
                    prop_assert!(
                        [200, 400, 504].contains(&status) || own_cap,
                        "{} {}: {} {}",
                        route,
                        shown,
                        status,
                        answer
                    );
                    if status == 400 {
                        prop_assert!(answer["error"]["kind"].is_string(), "{}: {}", shown, answer);
                    }
                }
                let (status, answer, took) = apps.sql(&apps.victim, "query", "SELECT 1").await;
                prop_assert_eq!(status, 200, "the victim after {}: {}", shown, answer);
                prop_assert!(
                    took < Duration::from_secs(2),
                    "the victim waited {:?} after {}",
                    took,
                    shown
                );
                let grown = apps.host.rss_kib().saturating_sub(idle);
                prop_assert!(
                    grown < 128 * 1024,
                    "{} took the host from {} KiB to {} KiB",
                    shown,
                    idle,
                    idle + grown
                );
                Ok(())
            })
        },
    );
}

#[test]
fn any_sqlite_statement_leaves_the_neighbour_served() {
    any_statement_leaves_the_neighbour_served(false, 60);
}

#[test]
fn any_postgres_statement_leaves_the_neighbour_served() {
    any_statement_leaves_the_neighbour_served(true, 40);
}
