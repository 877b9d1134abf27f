//! `host:capabilities/sql`: the app's own database through sqlx.
//!
//! - SQLite (the default): `<data-dir>/apps/<app>/app.sqlite`, opened with `ATTACH` refused (by
//!   the connection's limit and an authorizer), PRAGMAs on an allow-list and values no longer
//!   than half the app's `--memory-limit`, so a statement reaches no other file and no
//!   process-wide setting, and SQLite's heap stays within what `--memory-budget` counts.
//! - PostgreSQL (`--database-url`): a schema and a login role per app, made on first use. The
//!   app's statements run as its role, which owns its schema and has no rights on any other
//!   (`SET ROLE`, `RESET ROLE` and `set_config` cannot lift a login role's own rights), under
//!   a connection limit; a session is reset when its connection goes back to the pool.
//!
//! Every statement is held to its request's deadline (see `Lent`): interrupted on SQLite,
//! stopped by the server's own timeouts on PostgreSQL, and its connection closed rather than
//! reused when the request is dropped under it.
//!
//! Parameters are typed by their value (`integer` as int8, `real` as float8, `text`, `blob` as
//! bytea, `boolean`), and `null` as "unknown" so the server infers it. Because one statement may
//! be run with differently typed values, the parameter types are part of the prepared
//! statement's cache key (a leading comment), or a cached statement would be reused with the
//! wrong types.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use sqlx::error::DatabaseError;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow, PgTypeInfo, Postgres};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteRow};
use sqlx::{Column, Connection, Database, Executor, PgPool, Row, SqlitePool, TypeInfo, ValueRef};
use tokio::sync::OnceCell;
use tokio::time::Instant;
use wasmtime::component::Resource;

use crate::capabilities::CapabilityView;
use crate::capabilities::database::{self, Backend, BackendKind, HostDatabase};
use crate::capabilities::host::capabilities::sql::{
    DatabaseError as GuestDatabaseError, Host, HostTransaction, Rows, SqlError, Value,
};

type SqlResult<T> = Result<T, SqlError>;

/// One app's database.
pub enum AppDatabase {
    Sqlite(SqlitePool),
    Postgres(Box<PostgresApp>),
}

/// What bounds an app's SQL.
#[derive(Debug, Clone, Copy)]
pub struct SqlLimits {
    /// Connections a worker opens for the app (its concurrency, at most 10; 4 on SQLite).
    pub connections: u32,
    /// The host's workers: with `connections`, the app role's connection limit on PostgreSQL.
    pub workers: u32,
    /// The app's `--timeout`: its role's default statement, lock and idle-in-transaction
    /// timeouts on PostgreSQL (each request sets them to its remaining time).
    pub timeout: Option<Duration>,
    /// The app's `--memory-limit`, which bounds the values SQLite makes for it.
    pub memory_limit: u64,
    /// Whether the app is granted SQL (its SQLite heap is reserved only then).
    pub granted: bool,
}

impl SqlLimits {
    pub fn of(settings: &crate::settings::Settings, app: &crate::settings::App) -> SqlLimits {
        SqlLimits {
            connections: (app.settings.concurrency as u32).clamp(1, 10),
            workers: settings.workers.max(1) as u32,
            timeout: app.settings.timeout,
            memory_limit: app.settings.memory_limit,
            granted: app.capabilities.contains(&crate::settings::Capability::Sql),
        }
    }

    /// What SQLite may hold in a worker for `app`: its heap if it is granted SQL on SQLite
    /// files, else nothing.
    pub fn sqlite_heap_of(settings: &crate::settings::Settings, app: &crate::settings::App) -> u64 {
        let limits = SqlLimits::of(settings, app);
        let on_sqlite = app
            .settings
            .database_url
            .as_deref()
            .is_none_or(str::is_empty);
        if limits.granted && on_sqlite {
            limits.sqlite_heap()
        } else {
            0
        }
    }

    /// Connections a worker opens to the app's SQLite file: one writer at a time whatever the
    /// pool, and each connection costs a thread and its page cache.
    fn sqlite_connections(&self) -> u32 {
        self.connections.min(4)
    }

    /// The longest string, blob or statement SQLite makes for the app: half its
    /// `--memory-limit`, so that a value and its copy (a bound parameter and the record it is
    /// stored in, a column and the expression made of it) fit in what is counted for it.
    fn sqlite_longest(&self) -> u64 {
        (self.memory_limit / 2).clamp(1 << 20, i32::MAX as u64)
    }

    /// What SQLite may hold in a worker for the app: two values of the longest it may make,
    /// and each connection's cache and working memory.
    pub fn sqlite_heap(&self) -> u64 {
        (2 * self.sqlite_longest()).saturating_add(
            u64::from(self.sqlite_connections()).saturating_mul(database::SQLITE_CONNECTION_HEAP),
        )
    }

    /// The app role's `CONNECTION LIMIT`: twice what the workers open, for a worker that is
    /// retiring while its replacement serves (`--max-requests`, HUP, TTIN).
    fn role_connections(&self) -> u32 {
        self.connections
            .saturating_mul(self.workers)
            .saturating_mul(2)
    }
}

/// An app's schema of the host's PostgreSQL, reached as the app's own role.
pub struct PostgresApp {
    admin: Arc<HostDatabase>,
    options: PgConnectOptions,
    names: PostgresNames,
    pool: OnceCell<PgPool>,
    limits: SqlLimits,
    acquire_timeout: Duration,
}

/// The app's schema and role on PostgreSQL. Roles belong to the whole server, schemas to one
/// database: the role's name carries the database's, so hosts with other databases on the same
/// server never share (and re-password) a role.
pub struct PostgresNames {
    pub schema: String,
    pub role: String,
    password: String,
}

/// A pooled connection lent to one statement, or one transaction, of a request.
///
/// A connection whose request is dropped while a statement runs (its deadline passed) or a
/// transaction is open is closed, never pinged and put back: its state is unknown, and the
/// next request would wait for the statement still running on it. On SQLite the statement is
/// stopped at once through the progress handler (`stop`); PostgreSQL stops it itself at the
/// statement timeout this request set, and its backend ends with the connection.
pub struct Lent<DB: Database> {
    connection: PoolConnection<DB>,
    running: bool,
    in_transaction: bool,
    stop: Arc<AtomicBool>,
}

impl<DB: Database> Lent<DB> {
    fn new(connection: PoolConnection<DB>) -> Lent<DB> {
        Lent {
            connection,
            running: false,
            in_transaction: false,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The connection, for a statement: until `finished`, dropping this closes it.
    fn start(&mut self) -> &mut DB::Connection {
        self.running = true;
        &mut self.connection
    }

    fn finished(&mut self) {
        self.running = false;
    }
}

impl<DB: Database> Drop for Lent<DB> {
    fn drop(&mut self) {
        if self.running || self.in_transaction {
            self.stop.store(true, Ordering::Release);
            self.connection.close_on_drop();
        }
    }
}

/// An open transaction, as the guest holds it (`None` once it ended).
pub enum OpenTransaction {
    Sqlite(Option<Lent<sqlx::Sqlite>>),
    Postgres(Option<Lent<Postgres>>),
}

/// How long after the request's deadline the database stops a statement by itself. The host
/// drops the request at the deadline, which stops the statement at once (the connection is
/// closed, a SQLite statement interrupted); the database's own stop is for the statement the
/// drop did not reach, and comes a little later so that the client gets the host's 504 rather
/// than whatever the app makes of a timeout error.
const DEADLINE_GRACE: Duration = Duration::from_millis(100);

/// How often (in SQLite virtual machine instructions) a statement checks its deadline: a few
/// microseconds of work.
const SQLITE_PROGRESS_STEPS: i32 = 1000;

/// A connection of the app's SQLite pool for a request that must be done by `deadline`: its
/// statements are interrupted once the request is dropped, or past the deadline, and wait for
/// the write lock no longer than that.
async fn lend_sqlite(
    pool: &SqlitePool,
    deadline: Option<Instant>,
) -> SqlResult<Lent<sqlx::Sqlite>> {
    let mut lent = Lent::new(pool.acquire().await.map_err(sql_error)?);
    let stop = Arc::clone(&lent.stop);
    let deadline = deadline.map(|deadline| (deadline + DEADLINE_GRACE).into_std());
    let busy = deadline.map_or(database::SQLITE_BUSY_TIMEOUT, |deadline| {
        deadline.saturating_duration_since(std::time::Instant::now())
    });
    let mut handle = lent.connection.lock_handle().await.map_err(sql_error)?;
    handle.set_progress_handler(SQLITE_PROGRESS_STEPS, move || {
        !stop.load(Ordering::Acquire)
            && deadline.is_none_or(|deadline| std::time::Instant::now() < deadline)
    });
    // SAFETY: the handle is locked for this call.
    unsafe {
        libsqlite3_sys::sqlite3_busy_timeout(
            handle.as_raw_handle().as_ptr(),
            busy.min(database::SQLITE_BUSY_TIMEOUT).as_millis().max(1) as i32,
        );
    }
    drop(handle);
    Ok(lent)
}

/// A connection of the app's PostgreSQL pool for a request that must be done by `deadline`:
/// the server stops a statement, a lock wait or an idle transaction of it past the deadline.
async fn lend_postgres(pool: &PgPool, deadline: Option<Instant>) -> SqlResult<Lent<Postgres>> {
    let mut lent = Lent::new(pool.acquire().await.map_err(sql_error)?);
    if let Some(deadline) = deadline {
        let left = (deadline + DEADLINE_GRACE).saturating_duration_since(Instant::now());
        let milliseconds = left.as_millis().max(1).to_string();
        sqlx::query(
            "SELECT set_config('statement_timeout', $1, false), \
             set_config('lock_timeout', $1, false), \
             set_config('idle_in_transaction_session_timeout', $1, false)",
        )
        .bind(milliseconds)
        .execute(lent.start())
        .await
        .map_err(sql_error)?;
        lent.finished();
    }
    Ok(lent)
}

impl AppDatabase {
    pub async fn new(
        backend: &Backend,
        admin: &Arc<HostDatabase>,
        app: &str,
        master_key: &[u8; 32],
        limits: SqlLimits,
    ) -> Result<AppDatabase> {
        match &backend.kind {
            BackendKind::Sqlite(data_dir) => {
                let dir = data_dir.join("apps").join(app);
                crate::private_fs::create_dir_all(&dir)?;
                crate::private_fs::sqlite_files(&dir.join("app.sqlite"))?;
                database::write_ahead_log(&dir.join("app.sqlite")).await?;
                if limits.granted {
                    database::reserve_sqlite_heap(limits.sqlite_heap());
                }
                Ok(AppDatabase::Sqlite(sqlite_pool(
                    &dir.join("app.sqlite"),
                    limits.sqlite_connections(),
                    backend.acquire_timeout,
                    limits.sqlite_longest(),
                )))
            }
            BackendKind::Postgres(url) => {
                let options: PgConnectOptions = url.parse().with_context(|| {
                    format!(
                        "invalid --database-url {}",
                        crate::settings::redacted_url(url)
                    )
                })?;
                let database = options
                    .get_database()
                    .or(options.get_username().into())
                    .unwrap_or_default()
                    .to_owned();
                let names = PostgresNames::for_app(app, &database, master_key);
                let options = options
                    .username(&names.role)
                    .password(&names.password)
                    .options([("search_path", names.schema.as_str())]);
                Ok(AppDatabase::Postgres(Box::new(PostgresApp {
                    admin: Arc::clone(admin),
                    options,
                    names,
                    pool: OnceCell::new(),
                    limits,
                    acquire_timeout: backend.acquire_timeout,
                })))
            }
        }
    }

    pub async fn query(
        &self,
        statement: &str,
        params: Vec<Value>,
        limit: u64,
        deadline: Option<Instant>,
    ) -> SqlResult<Rows> {
        match self {
            AppDatabase::Sqlite(pool) => {
                let mut lent = lend_sqlite(pool, deadline).await?;
                let rows = sqlite_rows(lent.start(), statement, params, limit).await;
                lent.finished();
                rows
            }
            AppDatabase::Postgres(app) => {
                let mut lent = lend_postgres(app.pool().await?, deadline).await?;
                let rows = postgres_rows(lent.start(), statement, params, limit).await;
                lent.finished();
                rows
            }
        }
    }

    pub async fn execute(
        &self,
        statement: &str,
        params: Vec<Value>,
        deadline: Option<Instant>,
    ) -> SqlResult<u64> {
        match self {
            AppDatabase::Sqlite(pool) => {
                let mut lent = lend_sqlite(pool, deadline).await?;
                let done = sqlite_execute(lent.start(), statement, params).await;
                lent.finished();
                done
            }
            AppDatabase::Postgres(app) => {
                let mut lent = lend_postgres(app.pool().await?, deadline).await?;
                let done = postgres_execute(lent.start(), statement, params).await;
                lent.finished();
                done
            }
        }
    }

    pub async fn begin(&self, deadline: Option<Instant>) -> SqlResult<OpenTransaction> {
        Ok(match self {
            AppDatabase::Sqlite(pool) => {
                // Taking the write lock at once: a transaction that reads, then writes after
                // another writer, would be failed by SQLite instead of waiting.
                let lent = lend_sqlite(pool, deadline).await?;
                OpenTransaction::Sqlite(Some(begin(lent, "BEGIN IMMEDIATE").await?))
            }
            AppDatabase::Postgres(app) => {
                let lent = lend_postgres(app.pool().await?, deadline).await?;
                OpenTransaction::Postgres(Some(begin(lent, "BEGIN").await?))
            }
        })
    }
}

/// Opens a transaction on `lent`; it stays open (and the connection is closed if it is
/// dropped) until it is committed or rolled back.
async fn begin<DB: Database>(mut lent: Lent<DB>, statement: &'static str) -> SqlResult<Lent<DB>>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    lent.in_transaction = true;
    lent.start()
        .execute(sqlx::raw_sql(statement))
        .await
        .map_err(sql_error)?;
    lent.finished();
    Ok(lent)
}

impl PostgresApp {
    /// The pool, once the app's role and schema exist.
    async fn pool(&self) -> SqlResult<&PgPool> {
        let PostgresApp {
            admin,
            options,
            names,
            pool,
            limits,
            acquire_timeout,
        } = self;
        pool.get_or_try_init(|| async {
            provision(admin, names, limits, *acquire_timeout)
                .await
                .map_err(|error| {
                    SqlError::Unavailable(format!(
                        "cannot set up the app's schema {} and role {} ({error:#}); the --database-url user needs CREATEROLE",
                        names.schema, names.role
                    ))
                })?;
            Ok::<_, SqlError>(
                PgPoolOptions::new()
                    .max_connections(limits.connections)
                    .acquire_timeout(*acquire_timeout)
                    .max_lifetime(database::MAX_LIFETIME)
                    .test_before_acquire(true)
                    .after_release(|connection, _| {
                        Box::pin(async move { Ok(reset_postgres_session(connection).await) })
                    })
                    .connect_lazy_with(options.clone()),
            )
        })
        .await
    }
}

/// Makes a connection that comes back to the pool as a new one: settings (back to the role's
/// and the connection's own, so the search path stays), `LISTEN`s, advisory locks, temporary
/// tables, cursors and plans are gone, and sqlx's statement cache is cleared with the prepared
/// statements `DISCARD ALL` removes. A connection still in a transaction (`DISCARD ALL` refuses
/// to run there) is closed, which rolls it back.
async fn reset_postgres_session(connection: &mut sqlx::PgConnection) -> bool {
    (&mut *connection)
        .execute(sqlx::raw_sql("DISCARD ALL"))
        .await
        .is_ok()
        && connection.clear_cached_statements().await.is_ok()
}

impl PostgresNames {
    /// `app_<name>` and `host_app_<name>_<database>`, where the name is the app's in lower
    /// case with anything but letters, digits and `_` replaced, and a hash of the original added
    /// when that changed it, so two apps never share a schema; `<database>` is a short hash of
    /// the database's name.
    fn for_app(app: &str, database: &str, master_key: &[u8; 32]) -> PostgresNames {
        use aws_lc_rs::{digest, hmac};
        let short_hash = |text: &str| {
            hex::encode(&digest::digest(&digest::SHA256, text.as_bytes()).as_ref()[..4])
        };
        let mut name: String = app
            .chars()
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9' | '_') => c,
                _ => '_',
            })
            .take(32)
            .collect();
        if name != app {
            name = format!("{name}_{}", short_hash(app));
        }
        let password = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, master_key),
            format!("host:sql:v1:{app}").as_bytes(),
        );
        PostgresNames {
            schema: format!("app_{name}"),
            role: format!("host_app_{name}_{}", short_hash(database)),
            password: hex::encode(password.as_ref()),
        }
    }
}

/// Makes (or brings up to date) the app's role and schema. Several workers may do it at once:
/// they take turns on a lock of the host's own table, which no app role can reach, and give up
/// after the database timeout rather than hold a connection of the host's pool for longer.
async fn provision(
    admin: &HostDatabase,
    names: &PostgresNames,
    limits: &SqlLimits,
    acquire_timeout: Duration,
) -> Result<()> {
    let pool = admin.pool().await?;
    let mut transaction = pool.begin().await?;
    let PostgresNames {
        schema,
        role,
        password,
    } = names;
    let wait = acquire_timeout.as_millis().max(1);
    let connections = limits.role_connections();
    // The role's own defaults, for a statement of a request with no deadline; each request
    // sets them to its remaining time. A backend whose connection was closed under a running
    // statement notices within a second.
    let timeout = match limits.timeout {
        Some(timeout) => format!("'{}ms'", timeout.as_millis().max(1)),
        None => "DEFAULT".to_owned(),
    };
    let statements = format!(
        "SET LOCAL lock_timeout = '{wait}ms';
        SET LOCAL statement_timeout = '{wait}ms';
        LOCK TABLE host_state.setup IN EXCLUSIVE MODE;
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                CREATE ROLE {role} LOGIN;
            END IF;
        END $$;
        ALTER ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT CONNECTION LIMIT {connections} PASSWORD '{password}';
        CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role};
        ALTER ROLE {role} SET search_path = {schema};
        ALTER ROLE {role} SET statement_timeout = {timeout};
        ALTER ROLE {role} SET lock_timeout = {timeout};
        ALTER ROLE {role} SET idle_in_transaction_session_timeout = {timeout};
        ALTER ROLE {role} SET client_connection_check_interval = '1s';"
    );
    transaction
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statements)))
        .await?;
    transaction.commit().await?;
    Ok(())
}

fn sqlite_pool(
    path: &Path,
    max_connections: u32,
    acquire_timeout: Duration,
    longest: u64,
) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(database::SQLITE_BUSY_TIMEOUT)
        .foreign_keys(true)
        .pragma("cache_size", format!("-{}", database::SQLITE_APP_CACHE_KIB));
    SqlitePoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .after_connect(move |connection, _| {
            Box::pin(async move {
                let mut handle = connection.lock_handle().await?;
                confine(handle.as_raw_handle().as_ptr(), longest);
                Ok(())
            })
        })
        .after_release(|connection, _| {
            Box::pin(async move {
                let mut handle = connection.lock_handle().await?;
                handle.remove_progress_handler();
                // A transaction the app began with a statement of its own and left open is
                // rolled back by closing the connection.
                // SAFETY: the handle is locked for this call.
                let idle = unsafe {
                    libsqlite3_sys::sqlite3_get_autocommit(handle.as_raw_handle().as_ptr())
                } != 0;
                Ok(idle)
            })
        })
        .connect_lazy_with(options)
}

/// PRAGMAs an app may run with any argument: they read the schema or check the file.
const SQLITE_QUERY_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
    "optimize",
];

/// PRAGMAs an app may set: they change only its own file or its own connection's behaviour.
const SQLITE_SETTABLE_PRAGMAS: &[&str] = &[
    "user_version",
    "application_id",
    "foreign_keys",
    "defer_foreign_keys",
    "recursive_triggers",
    "automatic_index",
    "reverse_unordered_selects",
];

/// PRAGMAs an app may read but not set: the others change what the host decided (the journal,
/// the cache, the busy timeout) or the whole process (`hard_heap_limit`,
/// `temp_store_directory`), or tell it about the machine.
const SQLITE_READABLE_PRAGMAS: &[&str] = &[
    "page_count",
    "page_size",
    "freelist_count",
    "max_page_count",
    "schema_version",
    "data_version",
    "encoding",
    "journal_mode",
    "auto_vacuum",
    "synchronous",
    "cache_size",
    "busy_timeout",
    "collation_list",
    "function_list",
    "module_list",
    "pragma_list",
];

/// Whether an app may run `PRAGMA name` (`argument` is `None`) or `PRAGMA name = argument`.
fn pragma_allowed(name: &str, argument: Option<&str>) -> bool {
    let name = name.to_ascii_lowercase();
    let name = name.as_str();
    SQLITE_QUERY_PRAGMAS.contains(&name)
        || SQLITE_SETTABLE_PRAGMAS.contains(&name)
        || (argument.is_none() && SQLITE_READABLE_PRAGMAS.contains(&name))
}

/// An app's SQLite connection reaches its own file and stays within its memory: no other
/// database can be attached (the limit of attached databases is 0, and the authorizer refuses
/// ATTACH and DETACH, which `VACUUM INTO` needs too), PRAGMAs are on an allow-list, no string,
/// blob or statement may be longer than `longest` bytes, and the defensive mode keeps the
/// schema from being written directly.
fn confine(db: *mut libsqlite3_sys::sqlite3, longest: u64) {
    extern "C" fn authorize(
        _: *mut std::ffi::c_void,
        action: std::ffi::c_int,
        first: *const std::ffi::c_char,
        second: *const std::ffi::c_char,
        _: *const std::ffi::c_char,
        _: *const std::ffi::c_char,
    ) -> std::ffi::c_int {
        let text = |pointer: *const std::ffi::c_char| {
            // SAFETY: SQLite passes NULL or a NUL-terminated string valid for this call.
            (!pointer.is_null())
                .then(|| unsafe { std::ffi::CStr::from_ptr(pointer) }.to_string_lossy())
        };
        match action {
            libsqlite3_sys::SQLITE_ATTACH | libsqlite3_sys::SQLITE_DETACH => {
                libsqlite3_sys::SQLITE_DENY
            }
            libsqlite3_sys::SQLITE_PRAGMA => {
                let name = text(first).unwrap_or_default();
                if pragma_allowed(&name, text(second).as_deref()) {
                    libsqlite3_sys::SQLITE_OK
                } else {
                    libsqlite3_sys::SQLITE_DENY
                }
            }
            _ => libsqlite3_sys::SQLITE_OK,
        }
    }
    let longest = longest.min(i32::MAX as u64) as std::ffi::c_int;
    let (on, off): (std::ffi::c_int, std::ffi::c_int) = (1, 0);
    // SAFETY: `db` is the open connection sqlx handed over, locked for this call.
    unsafe {
        libsqlite3_sys::sqlite3_limit(db, libsqlite3_sys::SQLITE_LIMIT_ATTACHED, 0);
        libsqlite3_sys::sqlite3_limit(db, libsqlite3_sys::SQLITE_LIMIT_LENGTH, longest);
        libsqlite3_sys::sqlite3_limit(db, libsqlite3_sys::SQLITE_LIMIT_SQL_LENGTH, longest);
        libsqlite3_sys::sqlite3_limit(db, libsqlite3_sys::SQLITE_LIMIT_WORKER_THREADS, 0);
        libsqlite3_sys::sqlite3_db_config(
            db,
            libsqlite3_sys::SQLITE_DBCONFIG_DEFENSIVE,
            on,
            std::ptr::null_mut::<std::ffi::c_int>(),
        );
        libsqlite3_sys::sqlite3_db_config(
            db,
            libsqlite3_sys::SQLITE_DBCONFIG_TRUSTED_SCHEMA,
            off,
            std::ptr::null_mut::<std::ffi::c_int>(),
        );
        libsqlite3_sys::sqlite3_db_config(
            db,
            libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION,
            off,
            std::ptr::null_mut::<std::ffi::c_int>(),
        );
        libsqlite3_sys::sqlite3_set_authorizer(db, Some(authorize), std::ptr::null_mut());
    }
}

fn sql_error(error: sqlx::Error) -> SqlError {
    match &error {
        _ if database::is_unavailable(&error) => {
            SqlError::Unavailable(format!("the database is unreachable: {error}"))
        }
        sqlx::Error::Database(refused) => {
            SqlError::Database(guest_database_error(refused.as_ref()))
        }
        sqlx::Error::ColumnDecode { index, source } => {
            SqlError::UnsupportedType(format!("column {index}: {source}"))
        }
        _ => SqlError::Unavailable(format!("the database failed: {error}")),
    }
}

fn guest_database_error(error: &dyn DatabaseError) -> GuestDatabaseError {
    GuestDatabaseError {
        code: error.code().map(|code| code.into_owned()),
        message: error.message().to_owned(),
        constraint: error.constraint().map(str::to_owned),
    }
}

/// The statement with its parameters' types as a leading comment (see the module's comment).
fn keyed(statement: &str, params: &[Value]) -> String {
    let types: String = params
        .iter()
        .map(|value| match value {
            Value::Null => 'n',
            Value::Integer(_) => 'i',
            Value::Real(_) => 'r',
            Value::Text(_) => 't',
            Value::Blob(_) => 'b',
            Value::Boolean(_) => 'o',
        })
        .collect();
    format!("/* host:{types} */ {statement}")
}

/// A null the server types from its context (an untyped parameter).
struct UntypedNull;

impl sqlx::Type<Postgres> for UntypedNull {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(sqlx::postgres::types::Oid(0))
    }
}

impl sqlx::Encode<'_, Postgres> for UntypedNull {
    fn encode_by_ref(
        &self,
        _: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        Ok(sqlx::encode::IsNull::Yes)
    }
}

fn postgres_query(
    statement: &str,
    params: Vec<Value>,
) -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments> {
    let mut query = sqlx::query(sqlx::AssertSqlSafe(keyed(statement, &params)));
    for value in params {
        query = match value {
            Value::Null => query.bind(UntypedNull),
            Value::Integer(number) => query.bind(number),
            Value::Real(number) => query.bind(number),
            Value::Text(text) => query.bind(text),
            Value::Blob(bytes) => query.bind(bytes),
            Value::Boolean(flag) => query.bind(flag),
        };
    }
    query
}

fn sqlite_query(
    statement: &str,
    params: Vec<Value>,
) -> sqlx::query::Query<'static, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    let mut query = sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()));
    for value in params {
        query = match value {
            Value::Null => query.bind(None::<i64>),
            Value::Integer(number) => query.bind(number),
            Value::Real(number) => query.bind(number),
            Value::Text(text) => query.bind(text),
            Value::Blob(bytes) => query.bind(bytes),
            Value::Boolean(flag) => query.bind(flag),
        };
    }
    query
}

fn postgres_value(row: &PgRow, index: usize) -> SqlResult<Value> {
    let raw = row.try_get_raw(index).map_err(sql_error)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let type_name = raw.type_info().name().to_owned();
    let get = |error: sqlx::Error| sql_error(error);
    Ok(match type_name.as_str() {
        "BOOL" => Value::Boolean(row.try_get(index).map_err(get)?),
        "INT2" => Value::Integer(row.try_get::<i16, _>(index).map_err(get)?.into()),
        "INT4" => Value::Integer(row.try_get::<i32, _>(index).map_err(get)?.into()),
        "INT8" => Value::Integer(row.try_get(index).map_err(get)?),
        "OID" => Value::Integer(
            row.try_get::<sqlx::postgres::types::Oid, _>(index)
                .map_err(get)?
                .0
                .into(),
        ),
        "FLOAT4" => Value::Real(row.try_get::<f32, _>(index).map_err(get)?.into()),
        "FLOAT8" => Value::Real(row.try_get(index).map_err(get)?),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CITEXT" | "UNKNOWN" | "CHAR" => {
            Value::Text(row.try_get(index).map_err(get)?)
        }
        "BYTEA" => Value::Blob(row.try_get(index).map_err(get)?),
        "VOID" => Value::Null,
        other => {
            let column = row.columns()[index].name();
            return Err(SqlError::UnsupportedType(format!(
                "column {column} is of type {other}; cast it in SQL ({column}::text, {column}::float8, …)"
            )));
        }
    })
}

fn sqlite_value(row: &SqliteRow, index: usize) -> SqlResult<Value> {
    let raw = row.try_get_raw(index).map_err(sql_error)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let type_name = raw.type_info().name().to_owned();
    let get = |error: sqlx::Error| sql_error(error);
    // SQLite's values carry their own storage class, whatever the column says.
    Ok(match type_name.as_str() {
        "INTEGER" | "BOOLEAN" => Value::Integer(row.try_get(index).map_err(get)?),
        "REAL" => Value::Real(row.try_get(index).map_err(get)?),
        "BLOB" => Value::Blob(row.try_get(index).map_err(get)?),
        _ => Value::Text(row.try_get(index).map_err(get)?),
    })
}

/// Collects rows, refusing a result larger than `limit` bytes.
async fn collect<DB: Database>(
    mut rows: impl futures::Stream<Item = Result<DB::Row, sqlx::Error>> + Unpin,
    decode: fn(&DB::Row, usize) -> SqlResult<Value>,
    limit: u64,
) -> SqlResult<Rows> {
    let mut columns = Vec::new();
    let mut collected = Vec::new();
    let mut size = 0u64;
    while let Some(row) = rows.try_next().await.map_err(sql_error)? {
        // Rows already buffered come without a wait: without this, a flood of them would hold
        // the thread past the request's deadline, and the worker's heartbeat with it.
        tokio::task::consume_budget().await;
        if columns.is_empty() {
            columns = row.columns().iter().map(|c| c.name().to_owned()).collect();
        }
        let values = (0..row.len())
            .map(|index| decode(&row, index))
            .collect::<SqlResult<Vec<_>>>()?;
        size += values.iter().map(value_size).sum::<u64>();
        if size > limit {
            return Err(SqlError::TooLarge(limit));
        }
        collected.push(values);
    }
    Ok(Rows {
        columns,
        rows: collected,
    })
}

fn value_size(value: &Value) -> u64 {
    match value {
        Value::Text(text) => text.len() as u64 + 16,
        Value::Blob(bytes) => bytes.len() as u64 + 16,
        _ => 16,
    }
}

async fn postgres_rows<'e>(
    executor: impl Executor<'e, Database = Postgres>,
    statement: &str,
    params: Vec<Value>,
    limit: u64,
) -> SqlResult<Rows> {
    collect::<Postgres>(
        postgres_query(statement, params).fetch(executor),
        postgres_value,
        limit,
    )
    .await
}

async fn sqlite_rows<'e>(
    executor: impl Executor<'e, Database = sqlx::Sqlite>,
    statement: &str,
    params: Vec<Value>,
    limit: u64,
) -> SqlResult<Rows> {
    collect::<sqlx::Sqlite>(
        sqlite_query(statement, params).fetch(executor),
        sqlite_value,
        limit,
    )
    .await
}

// `fetch_many` is deprecated for running several statements at once, which the host never
// does; it is the stream of results `rows_affected` needs.
#[allow(deprecated)]
async fn postgres_execute<'e>(
    executor: impl Executor<'e, Database = Postgres>,
    statement: &str,
    params: Vec<Value>,
) -> SqlResult<u64> {
    rows_affected::<Postgres>(
        postgres_query(statement, params).fetch_many(executor),
        sqlx::postgres::PgQueryResult::rows_affected,
    )
    .await
}

// `fetch_many` is deprecated for running several statements at once, which the host never
// does; it is the stream of results `rows_affected` needs.
#[allow(deprecated)]
async fn sqlite_execute<'e>(
    executor: impl Executor<'e, Database = sqlx::Sqlite>,
    statement: &str,
    params: Vec<Value>,
) -> SqlResult<u64> {
    rows_affected::<sqlx::Sqlite>(
        sqlite_query(statement, params).fetch_many(executor),
        sqlx::sqlite::SqliteQueryResult::rows_affected,
    )
    .await
}

/// The rows a statement changed, its result rows read and dropped one by one, yielding as
/// `collect` does (sqlx's own `execute` reads them all in one go).
async fn rows_affected<DB: Database>(
    mut results: impl futures::Stream<
        Item = Result<sqlx::Either<DB::QueryResult, DB::Row>, sqlx::Error>,
    > + Unpin,
    count: fn(&DB::QueryResult) -> u64,
) -> SqlResult<u64> {
    let mut affected = 0u64;
    while let Some(result) = results.try_next().await.map_err(sql_error)? {
        tokio::task::consume_budget().await;
        if let sqlx::Either::Left(done) = result {
            affected = affected.saturating_add(count(&done));
        }
    }
    Ok(affected)
}

impl OpenTransaction {
    /// Commits or rolls back; a transaction ends once. One that fails to end is closed with
    /// its connection, which rolls it back.
    async fn end(&mut self, commit: bool) -> SqlResult<()> {
        let statement = if commit { "COMMIT" } else { "ROLLBACK" };
        match self {
            OpenTransaction::Sqlite(open) => end(open.take(), statement).await,
            OpenTransaction::Postgres(open) => end(open.take(), statement).await,
        }
    }
}

async fn end<DB: Database>(open: Option<Lent<DB>>, statement: &'static str) -> SqlResult<()>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    let Some(mut lent) = open else {
        return Err(SqlError::TransactionFinished);
    };
    lent.start()
        .execute(sqlx::raw_sql(statement))
        .await
        .map_err(sql_error)?;
    lent.finished();
    lent.in_transaction = false;
    Ok(())
}

impl CapabilityView<'_> {
    /// The most a result may hold: what is left of the guest's memory, which must take it.
    fn result_limit(&self) -> u64 {
        self.request
            .memory_limit
            .saturating_sub(self.request.instance_memory as u64)
    }

    /// Refuses to start a statement (or a commit) once the request's deadline has passed: the
    /// databases' own deadline checks come only every so often, and a short statement would run
    /// before the first.
    fn before_deadline(&self) -> SqlResult<()> {
        match self.request.deadline {
            Some(deadline) if Instant::now() >= deadline => {
                Err(SqlError::Database(GuestDatabaseError {
                    code: None,
                    message: "the request's deadline has passed; the statement was not run"
                        .to_owned(),
                    constraint: None,
                }))
            }
            _ => Ok(()),
        }
    }
}

impl Host for CapabilityView<'_> {
    async fn query(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<SqlResult<Rows>> {
        if let Err(late) = self.before_deadline() {
            return Ok(Err(late));
        }
        let limit = self.result_limit();
        let deadline = self.request.deadline;
        Ok(self
            .app
            .sql
            .query(&statement, params, limit, deadline)
            .await)
    }

    async fn execute(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<SqlResult<u64>> {
        if let Err(late) = self.before_deadline() {
            return Ok(Err(late));
        }
        let deadline = self.request.deadline;
        Ok(self.app.sql.execute(&statement, params, deadline).await)
    }

    async fn begin(&mut self) -> wasmtime::Result<SqlResult<Resource<OpenTransaction>>> {
        if let Err(late) = self.before_deadline() {
            return Ok(Err(late));
        }
        let deadline = self.request.deadline;
        Ok(match self.app.sql.begin(deadline).await {
            Ok(transaction) => Ok(self.table.push(transaction)?),
            Err(error) => Err(error),
        })
    }
}

impl HostTransaction for CapabilityView<'_> {
    async fn query(
        &mut self,
        transaction: Resource<OpenTransaction>,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<SqlResult<Rows>> {
        if let Err(late) = self.before_deadline() {
            return Ok(Err(late));
        }
        let limit = self.result_limit();
        Ok(match self.table.get_mut(&transaction)? {
            OpenTransaction::Sqlite(Some(lent)) => {
                let rows = sqlite_rows(lent.start(), &statement, params, limit).await;
                lent.finished();
                rows
            }
            OpenTransaction::Postgres(Some(lent)) => {
                let rows = postgres_rows(lent.start(), &statement, params, limit).await;
                lent.finished();
                rows
            }
            _ => Err(SqlError::TransactionFinished),
        })
    }

    async fn execute(
        &mut self,
        transaction: Resource<OpenTransaction>,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<SqlResult<u64>> {
        if let Err(late) = self.before_deadline() {
            return Ok(Err(late));
        }
        Ok(match self.table.get_mut(&transaction)? {
            OpenTransaction::Sqlite(Some(lent)) => {
                let done = sqlite_execute(lent.start(), &statement, params).await;
                lent.finished();
                done
            }
            OpenTransaction::Postgres(Some(lent)) => {
                let done = postgres_execute(lent.start(), &statement, params).await;
                lent.finished();
                done
            }
            _ => Err(SqlError::TransactionFinished),
        })
    }

    async fn commit(
        &mut self,
        transaction: Resource<OpenTransaction>,
    ) -> wasmtime::Result<SqlResult<()>> {
        if let Err(late) = self.before_deadline() {
            return Ok(Err(late));
        }
        Ok(self.table.get_mut(&transaction)?.end(true).await)
    }

    async fn rollback(
        &mut self,
        transaction: Resource<OpenTransaction>,
    ) -> wasmtime::Result<SqlResult<()>> {
        Ok(self.table.get_mut(&transaction)?.end(false).await)
    }

    async fn drop(&mut self, transaction: Resource<OpenTransaction>) -> wasmtime::Result<()> {
        // A transaction still open is closed with its connection, which rolls it back.
        self.table.delete(transaction)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_names_are_safe_and_distinct() {
        let key = [1u8; 32];
        let plain = PostgresNames::for_app("lenzeye", "prod", &key);
        assert_eq!(plain.schema, "app_lenzeye");
        assert!(
            plain.role.starts_with("host_app_lenzeye_"),
            "{}",
            plain.role
        );
        assert_ne!(
            plain.role,
            PostgresNames::for_app("lenzeye", "staging", &key).role
        );
        let dashed = PostgresNames::for_app("my-app", "prod", &key);
        let underscored = PostgresNames::for_app("my_app", "prod", &key);
        assert_ne!(dashed.schema, underscored.schema);
        assert!(dashed.schema.starts_with("app_my_app_"));
        let hostile = PostgresNames::for_app("x'; DROP TABLE y; --", "prod", &key);
        assert!(
            hostile
                .role
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        );
        assert!(hostile.role.len() <= 63);
        let other_key = PostgresNames::for_app("lenzeye", "prod", &[2u8; 32]);
        assert_ne!(plain.password, other_key.password);
    }

    #[test]
    fn sqlite_heap_is_two_of_the_longest_values_and_a_mebibyte_a_connection() {
        let limits = |connections, memory_limit| SqlLimits {
            connections,
            workers: 1,
            timeout: None,
            memory_limit,
            granted: true,
        };
        assert_eq!(limits(4, 16 << 20).sqlite_longest(), 8 << 20);
        assert_eq!(limits(4, 16 << 20).sqlite_heap(), 20 << 20);
        // At most 4 connections to a SQLite file; at least 1 MiB values.
        assert_eq!(limits(10, 16 << 20).sqlite_heap(), 20 << 20);
        assert_eq!(limits(1, 1 << 20).sqlite_heap(), 3 << 20);
    }

    #[test]
    fn pragmas_that_reach_the_process_or_the_host_settings_are_refused() {
        assert!(pragma_allowed("table_info", Some("notes")));
        assert!(pragma_allowed("USER_VERSION", Some("3")));
        assert!(pragma_allowed("journal_mode", None));
        assert!(!pragma_allowed("journal_mode", Some("off")));
        for refused in [
            "hard_heap_limit",
            "soft_heap_limit",
            "temp_store_directory",
            "data_store_directory",
            "mmap_size",
            "threads",
            "writable_schema",
            "cache_size",
        ] {
            assert!(!pragma_allowed(refused, Some("1")), "{refused}");
        }
        assert!(!pragma_allowed("temp_store_directory", None));
    }
}
