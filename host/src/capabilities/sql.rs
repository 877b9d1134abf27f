//! `host:capabilities/sql`: the app's own database through sqlx.
//!
//! - SQLite (the default): `<data-dir>/apps/<app>/app.sqlite`, opened with `ATTACH` refused (by
//!   the connection's limit and an authorizer), so a statement reaches no other file.
//! - PostgreSQL (`--database-url`): a schema and a login role per app, made on first use. The
//!   app's statements run as its role, which owns its schema and has no rights on any other
//!   (`SET ROLE`, `RESET ROLE` and `set_config` cannot lift a login role's own rights).
//!
//! Parameters are typed by their value (`integer` as int8, `real` as float8, `text`, `blob` as
//! bytea, `boolean`), and `null` as "unknown" so the server infers it. Because one statement may
//! be run with differently typed values, the parameter types are part of the prepared
//! statement's cache key (a leading comment), or a cached statement would be reused with the
//! wrong types.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use sqlx::error::DatabaseError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow, PgTypeInfo, Postgres};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{Column, Database, Executor, PgPool, Row, SqlitePool, Transaction, TypeInfo, ValueRef};
use tokio::sync::OnceCell;
use wasmtime::component::Resource;

use crate::capabilities::host::capabilities::sql::{
    DatabaseError as GuestDatabaseError, Host, HostTransaction, Rows, SqlError, Value,
};
use crate::database::{self, Backend, BackendKind, HostDatabase};
use crate::guest::GuestState;

type Answer<T> = Result<T, SqlError>;

/// One app's database.
pub enum AppDatabase {
    Sqlite(SqlitePool),
    Postgres(Box<PostgresApp>),
}

/// An app's schema of the host's PostgreSQL, reached as the app's own role.
pub struct PostgresApp {
    admin: Arc<HostDatabase>,
    options: PgConnectOptions,
    names: PostgresNames,
    pool: OnceCell<PgPool>,
    max_connections: u32,
    acquire_timeout: std::time::Duration,
}

/// The app's schema and role on PostgreSQL. Roles belong to the whole server, schemas to one
/// database: the role's name carries the database's, so hosts with other databases on the same
/// server never share (and re-password) a role.
pub struct PostgresNames {
    pub schema: String,
    pub role: String,
    password: String,
}

/// An open transaction, as the guest holds it.
pub enum OpenTransaction {
    Sqlite(Option<Transaction<'static, sqlx::Sqlite>>),
    Postgres(Option<Transaction<'static, Postgres>>),
}

impl AppDatabase {
    pub fn new(
        backend: &Backend,
        admin: &Arc<HostDatabase>,
        app: &str,
        master_key: &[u8; 32],
        max_connections: u32,
    ) -> Result<AppDatabase> {
        let pool_size = max_connections.clamp(1, 10);
        match &backend.kind {
            BackendKind::Sqlite(data_dir) => {
                // One writer at a time whatever the pool; readers are quick. Each connection
                // costs a thread and its page cache.
                let pool_size = pool_size.min(4);
                let dir = data_dir.join("apps").join(app);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                Ok(AppDatabase::Sqlite(sqlite_pool(
                    &dir.join("app.sqlite"),
                    pool_size,
                    backend.acquire_timeout,
                )))
            }
            BackendKind::Postgres(url) => {
                let options: PgConnectOptions = url.parse().with_context(|| {
                    format!("invalid --database-url {}", database::redacted(url))
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
                    max_connections: pool_size,
                    acquire_timeout: backend.acquire_timeout,
                })))
            }
        }
    }

    pub async fn query(&self, statement: &str, params: Vec<Value>, limit: u64) -> Answer<Rows> {
        match self {
            AppDatabase::Sqlite(pool) => sqlite_rows(pool, statement, params, limit).await,
            AppDatabase::Postgres(app) => {
                postgres_rows(app.pool().await?, statement, params, limit).await
            }
        }
    }

    pub async fn execute(&self, statement: &str, params: Vec<Value>) -> Answer<u64> {
        match self {
            AppDatabase::Sqlite(pool) => sqlite_execute(pool, statement, params).await,
            AppDatabase::Postgres(app) => {
                postgres_execute(app.pool().await?, statement, params).await
            }
        }
    }

    pub async fn begin(&self) -> Answer<OpenTransaction> {
        Ok(match self {
            AppDatabase::Sqlite(pool) => {
                // Taking the write lock at once: a transaction that reads, then writes after
                // another writer, would be failed by SQLite instead of waiting.
                OpenTransaction::Sqlite(Some(
                    pool.begin_with("BEGIN IMMEDIATE")
                        .await
                        .map_err(sql_error)?,
                ))
            }
            AppDatabase::Postgres(app) => {
                OpenTransaction::Postgres(Some(app.pool().await?.begin().await.map_err(sql_error)?))
            }
        })
    }
}

impl PostgresApp {
    /// The pool, once the app's role and schema exist.
    async fn pool(&self) -> Answer<&PgPool> {
        let PostgresApp {
            admin,
            options,
            names,
            pool,
            max_connections,
            acquire_timeout,
        } = self;
        pool.get_or_try_init(|| async {
            provision(admin, names).await.map_err(|error| {
                SqlError::Unavailable(format!(
                    "cannot set up the app's schema {} and role {} ({error:#}); the --database-url user needs CREATEROLE",
                    names.schema, names.role
                ))
            })?;
            Ok::<_, SqlError>(
                PgPoolOptions::new()
                    .max_connections(*max_connections)
                    .acquire_timeout(*acquire_timeout)
                    .max_lifetime(database::MAX_LIFETIME)
                    .test_before_acquire(true)
                    .connect_lazy_with(options.clone()),
            )
        })
        .await
    }
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
/// an advisory lock makes them take turns.
async fn provision(admin: &HostDatabase, names: &PostgresNames) -> Result<()> {
    let pool = admin.pool().await?;
    let mut transaction = pool.begin().await?;
    let PostgresNames {
        schema,
        role,
        password,
    } = names;
    let statements = format!(
                "SELECT pg_advisory_xact_lock(7283491624);
                DO $$ BEGIN
                    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                        CREATE ROLE {role} LOGIN;
                    END IF;
                END $$;
                ALTER ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT PASSWORD '{password}';
                CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role};
                ALTER ROLE {role} SET search_path = {schema};"
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
    acquire_timeout: std::time::Duration,
) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(std::time::Duration::from_secs(30))
        .foreign_keys(true)
        .pragma("cache_size", format!("-{}", database::SQLITE_APP_CACHE_KIB));
    SqlitePoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .after_connect(|connection, _| {
            Box::pin(async move {
                let mut handle = connection.lock_handle().await?;
                confine(handle.as_raw_handle().as_ptr());
                Ok(())
            })
        })
        .connect_lazy_with(options)
}

/// No other database file can be attached to a connection: its limit of attached databases is
/// 0, and an authorizer refuses ATTACH and DETACH (which `VACUUM INTO` needs too).
fn confine(db: *mut libsqlite3_sys::sqlite3) {
    extern "C" fn authorize(
        _: *mut std::ffi::c_void,
        action: std::ffi::c_int,
        _: *const std::ffi::c_char,
        _: *const std::ffi::c_char,
        _: *const std::ffi::c_char,
        _: *const std::ffi::c_char,
    ) -> std::ffi::c_int {
        match action {
            libsqlite3_sys::SQLITE_ATTACH | libsqlite3_sys::SQLITE_DETACH => {
                libsqlite3_sys::SQLITE_DENY
            }
            _ => libsqlite3_sys::SQLITE_OK,
        }
    }
    // SAFETY: `db` is the open connection sqlx handed over, locked for this call.
    unsafe {
        libsqlite3_sys::sqlite3_limit(db, libsqlite3_sys::SQLITE_LIMIT_ATTACHED, 0);
        libsqlite3_sys::sqlite3_set_authorizer(db, Some(authorize), std::ptr::null_mut());
    }
}

fn sql_error(error: sqlx::Error) -> SqlError {
    match &error {
        sqlx::Error::Database(refused) => {
            SqlError::Database(guest_database_error(refused.as_ref()))
        }
        _ if database::is_unavailable(&error) => {
            SqlError::Unavailable(format!("the database is unreachable: {error}"))
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

fn postgres_value(row: &PgRow, index: usize) -> Answer<Value> {
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

fn sqlite_value(row: &SqliteRow, index: usize) -> Answer<Value> {
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
    decode: fn(&DB::Row, usize) -> Answer<Value>,
    limit: u64,
) -> Answer<Rows> {
    let mut columns = Vec::new();
    let mut collected = Vec::new();
    let mut size = 0u64;
    while let Some(row) = rows.try_next().await.map_err(sql_error)? {
        if columns.is_empty() {
            columns = row.columns().iter().map(|c| c.name().to_owned()).collect();
        }
        let values = (0..row.len())
            .map(|index| decode(&row, index))
            .collect::<Answer<Vec<_>>>()?;
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
) -> Answer<Rows> {
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
) -> Answer<Rows> {
    collect::<sqlx::Sqlite>(
        sqlite_query(statement, params).fetch(executor),
        sqlite_value,
        limit,
    )
    .await
}

async fn postgres_execute<'e>(
    executor: impl Executor<'e, Database = Postgres>,
    statement: &str,
    params: Vec<Value>,
) -> Answer<u64> {
    Ok(postgres_query(statement, params)
        .execute(executor)
        .await
        .map_err(sql_error)?
        .rows_affected())
}

async fn sqlite_execute<'e>(
    executor: impl Executor<'e, Database = sqlx::Sqlite>,
    statement: &str,
    params: Vec<Value>,
) -> Answer<u64> {
    Ok(sqlite_query(statement, params)
        .execute(executor)
        .await
        .map_err(sql_error)?
        .rows_affected())
}

impl OpenTransaction {
    /// Commits or rolls back; a transaction ends once.
    async fn end(&mut self, commit: bool) -> Answer<()> {
        let ended = match self {
            OpenTransaction::Sqlite(open) => match open.take() {
                Some(open) if commit => open.commit().await,
                Some(open) => open.rollback().await,
                None => return Err(SqlError::TransactionFinished),
            },
            OpenTransaction::Postgres(open) => match open.take() {
                Some(open) if commit => open.commit().await,
                Some(open) => open.rollback().await,
                None => return Err(SqlError::TransactionFinished),
            },
        };
        ended.map_err(sql_error)
    }
}

impl GuestState {
    fn database(&self) -> wasmtime::Result<&AppDatabase> {
        self.capabilities().sql()
    }

    /// The most a result may hold: what the guest's memory could take.
    fn result_limit(&self) -> u64 {
        self.memory_limit()
    }
}

impl Host for GuestState {
    async fn query(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Answer<Rows>> {
        let limit = self.result_limit();
        Ok(self.database()?.query(&statement, params, limit).await)
    }

    async fn execute(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Answer<u64>> {
        Ok(self.database()?.execute(&statement, params).await)
    }

    async fn begin(&mut self) -> wasmtime::Result<Answer<Resource<OpenTransaction>>> {
        Ok(match self.database()?.begin().await {
            Ok(transaction) => Ok(self.table().push(transaction)?),
            Err(error) => Err(error),
        })
    }
}

impl HostTransaction for GuestState {
    async fn query(
        &mut self,
        transaction: Resource<OpenTransaction>,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Answer<Rows>> {
        let limit = self.result_limit();
        Ok(match self.table().get_mut(&transaction)? {
            OpenTransaction::Sqlite(Some(open)) => {
                sqlite_rows(&mut **open, &statement, params, limit).await
            }
            OpenTransaction::Postgres(Some(open)) => {
                postgres_rows(&mut **open, &statement, params, limit).await
            }
            _ => Err(SqlError::TransactionFinished),
        })
    }

    async fn execute(
        &mut self,
        transaction: Resource<OpenTransaction>,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Answer<u64>> {
        Ok(match self.table().get_mut(&transaction)? {
            OpenTransaction::Sqlite(Some(open)) => {
                sqlite_execute(&mut **open, &statement, params).await
            }
            OpenTransaction::Postgres(Some(open)) => {
                postgres_execute(&mut **open, &statement, params).await
            }
            _ => Err(SqlError::TransactionFinished),
        })
    }

    async fn commit(
        &mut self,
        transaction: Resource<OpenTransaction>,
    ) -> wasmtime::Result<Answer<()>> {
        Ok(self.table().get_mut(&transaction)?.end(true).await)
    }

    async fn rollback(
        &mut self,
        transaction: Resource<OpenTransaction>,
    ) -> wasmtime::Result<Answer<()>> {
        Ok(self.table().get_mut(&transaction)?.end(false).await)
    }

    async fn drop(&mut self, transaction: Resource<OpenTransaction>) -> wasmtime::Result<()> {
        // An open transaction is rolled back when sqlx drops it.
        self.table().delete(transaction)?;
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
}
