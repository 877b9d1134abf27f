//! Where the host keeps its own state (the HMAC registry) and its apps' SQL databases: SQLite
//! files under the data directory by default, or one PostgreSQL database (`--database-url`),
//! in which the host's state has a schema of its own and every app a schema and a role of its
//! own.
//!
//! Connections follow the seed's pool settings: checked before use, replaced after 180 s,
//! 30 s to get one (which also bounds a connection attempt: sqlx has no separate connect
//! timeout). Nothing connects before it is needed, so a database that is down at start only
//! fails the requests that need it, with an `unavailable` error, until it is back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{AnyPool, Connection, Executor};
use tokio::sync::OnceCell;

use crate::settings::Settings;

pub const MAX_LIFETIME: Duration = Duration::from_secs(180);
// The host's own tables are in the schema `host_state` on PostgreSQL; apps' roles have no
// rights on it.

/// Which database the host was configured with, and how long a request waits for it.
#[derive(Debug, Clone)]
pub struct Backend {
    pub kind: BackendKind,
    pub acquire_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// SQLite files under this directory.
    Sqlite(PathBuf),
    /// A PostgreSQL database.
    Postgres(String),
}

impl Backend {
    /// The database of `database_url` (an app's own, or the host's), else SQLite files.
    pub fn of(settings: &Settings, database_url: Option<&str>) -> Result<Backend> {
        let kind = |kind| {
            Ok(Backend {
                kind,
                acquire_timeout: settings.database_timeout,
            })
        };
        match database_url {
            None | Some("") => kind(BackendKind::Sqlite(settings.data_dir.clone())),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                kind(BackendKind::Postgres(url.to_owned()))
            }
            Some(url) => bail!(
                "--database-url must be a postgres:// URL (without it, the host uses SQLite files under --data-dir), got {}",
                crate::settings::redacted_url(url)
            ),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.kind, BackendKind::Postgres(_))
    }
}

/// The host's own tables, in the host's database.
pub struct HostDatabase {
    pool: AnyPool,
    backend: Backend,
    tables: OnceCell<()>,
}

impl HostDatabase {
    /// A lazy pool: nothing connects until the first query.
    pub async fn new(backend: &Backend) -> Result<Arc<HostDatabase>> {
        sqlx::any::install_default_drivers();
        // SQLite runs one writer at a time whatever the pool; each connection costs a thread
        // and its page cache.
        let connections = if backend.is_postgres() { 4 } else { 2 };
        let options = AnyPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(backend.acquire_timeout)
            .max_lifetime(MAX_LIFETIME)
            .test_before_acquire(true);
        let pool = match &backend.kind {
            BackendKind::Sqlite(dir) => {
                reserve_sqlite_heap(SQLITE_HOST_TABLES_HEAP);
                crate::private_fs::create_dir_all(dir).context("the data directory")?;
                crate::private_fs::sqlite_files(&dir.join("host.sqlite"))?;
                write_ahead_log(&dir.join("host.sqlite")).await?;
                options
                    .after_connect(|connection, _| {
                        Box::pin(async move {
                            connection
                                .execute(sqlx::raw_sql(SQLITE_PRAGMAS))
                                .await
                                .map(drop)
                        })
                    })
                    .after_release(|connection, _| {
                        Box::pin(async move { Ok(out_of_transaction(connection).await) })
                    })
                    .connect_lazy(&sqlite_url(&dir.join("host.sqlite")))
            }
            BackendKind::Postgres(url) => options
                .after_connect(|connection, _| {
                    Box::pin(async move {
                        connection
                            .execute("SET search_path TO host_state")
                            .await
                            .map(drop)
                    })
                })
                .connect_lazy(url),
        }
        .context("invalid database URL")?;
        Ok(Arc::new(HostDatabase {
            pool,
            backend: backend.clone(),
            tables: OnceCell::new(),
        }))
    }

    pub fn is_postgres(&self) -> bool {
        self.backend.is_postgres()
    }

    /// The pool, once the host's tables exist (made on first use; a failure is retried on the
    /// next use).
    pub async fn pool(&self) -> Result<&AnyPool, sqlx::Error> {
        self.tables
            .get_or_try_init(|| async {
                let mut transaction = self.pool.begin().await?;
                if self.is_postgres() {
                    // Workers start together: one of them makes the tables, the others wait,
                    // on the lock of the host's own table `setup` (which no app role can
                    // reach) once it exists, and before that, when no app role exists yet in
                    // this database, on an advisory lock.
                    let wait = self.backend.acquire_timeout.as_millis().max(1);
                    transaction
                        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                            "SET LOCAL lock_timeout = '{wait}ms'"
                        ))))
                        .await?;
                    let set_up: bool =
                        sqlx::query_scalar("SELECT to_regclass('host_state.setup') IS NOT NULL")
                            .fetch_one(&mut *transaction)
                            .await?;
                    if set_up {
                        transaction
                            .execute("LOCK TABLE host_state.setup IN EXCLUSIVE MODE")
                            .await?;
                    } else {
                        transaction
                            .execute("SELECT pg_advisory_xact_lock(7283491623)")
                            .await?;
                        transaction
                            .execute(sqlx::raw_sql(
                                "CREATE SCHEMA IF NOT EXISTS host_state; \
                                 CREATE TABLE IF NOT EXISTS host_state.setup (done BOOLEAN)",
                            ))
                            .await?;
                    }
                }
                let blob = if self.is_postgres() { "BYTEA" } else { "BLOB" };
                transaction
                    .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "CREATE TABLE IF NOT EXISTS hmac_entries (
                                app TEXT NOT NULL,
                                name TEXT NOT NULL,
                                key_id TEXT NOT NULL,
                                tag TEXT,
                                touched BIGINT,
                                PRIMARY KEY (app, name)
                            );
                            CREATE TABLE IF NOT EXISTS hmac_parts (
                                app TEXT NOT NULL,
                                name TEXT NOT NULL,
                                number BIGINT NOT NULL,
                                size BIGINT NOT NULL,
                                mac {blob} NOT NULL,
                                etag TEXT NOT NULL,
                                PRIMARY KEY (app, name, number)
                            );"
                    ))))
                    .await?;
                // Tables made before entries had a time of last use (seconds since the epoch:
                // abandoned ones are discarded after `--upload-expiry`).
                let has_touched: i64 = sqlx::query_scalar(if self.is_postgres() {
                    "SELECT COUNT(*) FROM information_schema.columns \
                     WHERE table_schema = 'host_state' AND table_name = 'hmac_entries' \
                     AND column_name = 'touched'"
                } else {
                    "SELECT COUNT(*) FROM pragma_table_info('hmac_entries') WHERE name = 'touched'"
                })
                .fetch_one(&mut *transaction)
                .await?;
                if has_touched == 0 {
                    transaction
                        .execute("ALTER TABLE hmac_entries ADD COLUMN touched BIGINT")
                        .await?;
                }
                transaction.commit().await?;
                Ok::<(), sqlx::Error>(())
            })
            .await?;
        Ok(&self.pool)
    }

    /// A transaction that will write. On SQLite it takes the write lock at once: a transaction
    /// that reads first and writes later can find another writer got in between, and SQLite
    /// then fails it at once instead of waiting.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        let pool = self.pool().await?;
        if self.is_postgres() {
            pool.begin().await
        } else {
            pool.begin_with("BEGIN IMMEDIATE").await
        }
    }

    /// `FOR UPDATE` where the database has it (SQLite serialises writers anyway).
    pub fn lock_rows(&self) -> &'static str {
        if self.is_postgres() {
            " FOR UPDATE"
        } else {
            ""
        }
    }
}

/// Whether a SQLite connection given back to the pool is out of any transaction, and may serve
/// the next one. A write that failed for a full disk or an I/O error has SQLite roll its
/// transaction back itself; the ROLLBACK sqlx then sends fails ("no transaction is active"),
/// and sqlx goes on counting the connection as inside one, refusing every later `BEGIN
/// IMMEDIATE` on it. Such a connection is closed rather than reused.
async fn out_of_transaction(connection: &mut sqlx::AnyConnection) -> bool {
    // A committed transaction has settled the count already (the usual case: no round trip).
    // A dropped one has queued a rollback: the ping runs after it.
    !connection.is_in_transaction()
        || (connection.ping().await.is_ok() && !connection.is_in_transaction())
}

pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Writers wait for each other (30 s) rather than fail. The page cache is kept small (SQLite's
/// default is 2 MiB a connection): the host's tables are small, and memory is what a 512 MiB
/// plan runs out of. The file is in write-ahead-log mode already (`write_ahead_log`).
pub const SQLITE_PRAGMAS: &str =
    "PRAGMA busy_timeout = 30000; PRAGMA foreign_keys = ON; PRAGMA cache_size = -256;";

/// How long a SQLite statement waits for another connection's write lock.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Puts the SQLite file at `path` in write-ahead-log mode, which lets readers in other
/// connections and workers go on during a write. Done once per process, before any pool
/// connects (the pools' connections do not set it): the switch needs a lock that SQLite's busy timeout does not wait for, so
/// connections that each switched a new, empty file as they opened (the first requests on a
/// fresh data directory, at once) could fail one another with `database is locked`. Here a
/// switch that finds the file in use is tried again for as long as a writer would wait; the
/// mode is then the file's own, and connections need not set it.
pub async fn write_ahead_log(path: &Path) -> Result<()> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(SQLITE_BUSY_TIMEOUT);
    let mut connection = SqliteConnection::connect_with(&options)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let give_up = std::time::Instant::now() + SQLITE_BUSY_TIMEOUT;
    loop {
        match sqlx::query_scalar::<_, String>("PRAGMA journal_mode = WAL")
            .fetch_one(&mut connection)
            .await
        {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => break,
            Ok(mode) => bail!(
                "cannot put {} in write-ahead-log mode: it stayed in {mode} mode",
                path.display()
            ),
            Err(error) if is_busy(&error) && std::time::Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => {
                return Err(error).with_context(|| {
                    format!("cannot put {} in write-ahead-log mode", path.display())
                });
            }
        }
    }
    connection
        .close()
        .await
        .with_context(|| format!("cannot close {}", path.display()))
}

/// Whether SQLite refused for a lock another connection holds (`SQLITE_BUSY`, extended or not).
fn is_busy(error: &sqlx::Error) -> bool {
    const SQLITE_BUSY: i32 = 5;
    matches!(error, sqlx::Error::Database(refused)
        if refused.code().and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| code & 0xff == SQLITE_BUSY))
}

/// The page cache of an app's SQLite connection, in KiB.
pub const SQLITE_APP_CACHE_KIB: i64 = 256;

/// What one SQLite connection may hold besides the values it makes: its page cache and
/// working memory (statements, lookaside, sorter).
pub const SQLITE_CONNECTION_HEAP: u64 = 1 << 20;

/// What SQLite may hold for the host's own tables (the registry) in a worker: its two
/// connections' caches and working memory.
pub const SQLITE_HOST_TABLES_HEAP: u64 = 2 * SQLITE_CONNECTION_HEAP;

/// What SQLite may hold in this process so far (the sum of `reserve_sqlite_heap`).
static SQLITE_HEAP: AtomicU64 = AtomicU64::new(0);

/// Adds `bytes` to the heap SQLite may hold in this worker, for an app's connections. SQLite's
/// limit is process-wide (`sqlite3_hard_heap_limit64`), so it bounds the worker, not one app:
/// an allocation beyond it fails (`out of memory`) and its statement with it. Only the host
/// sets it: no app may run `PRAGMA hard_heap_limit`.
pub fn reserve_sqlite_heap(bytes: u64) {
    let total = SQLITE_HEAP
        .fetch_add(bytes, Ordering::Relaxed)
        .saturating_add(bytes);
    // SAFETY: sqlite3_hard_heap_limit64 may be called at any time, from any thread.
    unsafe {
        libsqlite3_sys::sqlite3_hard_heap_limit64(total.min(i64::MAX as u64) as i64);
    }
}

/// Whether an error means the database could not be used at all (as opposed to refusing a
/// statement).
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Configuration(_) => true,
        sqlx::Error::Database(error) => is_outage(error.as_ref()),
        _ => false,
    }
}

/// Whether a database's error says the database could not serve, not that it refused the
/// statement: the server going down or not yet up, its connections or disk exhausted
/// (PostgreSQL's SQLSTATEs); SQLite busy past its timeout, out of disk or unable to read its
/// file (its result codes). Told apart by driver: a SQLSTATE such as 42501 is also a number.
fn is_outage(error: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = error.code() else {
        return false;
    };
    if error
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        // Connection exceptions (not 08P01, a protocol violation: a statement's fault), the
        // server shutting down or starting, out of disk, memory or connections.
        const OUTAGES: [&str; 11] = [
            "08000", "08001", "08003", "08004", "08006", "57P01", "57P02", "57P03", "53100",
            "53200", "53300",
        ];
        return OUTAGES.contains(&code.as_ref());
    }
    // SQLite: the primary result code is the low byte of the extended one.
    const SQLITE_BUSY: i64 = 5;
    const SQLITE_IOERR: i64 = 10;
    const SQLITE_FULL: i64 = 13;
    const SQLITE_CANTOPEN: i64 = 14;
    error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
        && code.parse::<i64>().is_ok_and(|extended| {
            matches!(
                extended & 0xff,
                SQLITE_BUSY | SQLITE_IOERR | SQLITE_FULL | SQLITE_CANTOPEN
            )
        })
}

pub type Row = AnyRow;
