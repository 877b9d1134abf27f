//! The tests' PostgreSQL: its URL and address, psql, and the clean-up of an app's schema and
//! roles.

use super::*;

/// The PostgreSQL server of the tests: `$BLACKBOX_DATABASE_URL` (tests/run sets it).
pub fn database_url() -> String {
    std::env::var("BLACKBOX_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Runs SQL on the tests' PostgreSQL as its administrator, with psql; returns the output rows.
pub fn psql(sql: &str) -> String {
    let output = Command::new("psql")
        .args([
            &database_url(),
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .output()
        .expect("psql is needed to look into the tests' PostgreSQL");
    assert!(
        output.status.success(),
        "psql failed on {sql}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Removes what the host made on PostgreSQL for `app`: its schema, its roles, its registry rows.
pub fn drop_postgres_app(app: &str) {
    let app = app.to_ascii_lowercase();
    psql(&format!(
        "DROP SCHEMA IF EXISTS app_{app} CASCADE;
         DO $$ DECLARE r record; BEGIN
            FOR r IN SELECT rolname FROM pg_roles WHERE rolname LIKE 'host\\_app\\_{app}\\_%' LOOP
                -- What the role owns outside its schema (large objects) goes with it.
                EXECUTE 'DROP OWNED BY ' || quote_ident(r.rolname);
                EXECUTE 'DROP ROLE ' || quote_ident(r.rolname);
            END LOOP;
         END $$;
         DO $$ BEGIN
            IF to_regclass('host_state.hmac_parts') IS NOT NULL THEN
                DELETE FROM host_state.hmac_parts WHERE app = '{app}';
                DELETE FROM host_state.hmac_entries WHERE app = '{app}';
            END IF;
         END $$;"
    ));
}

/// The `host:port` of the tests' PostgreSQL URL.
fn database_authority() -> String {
    let url = database_url();
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let after_user = after_scheme
        .split_once('@')
        .map_or(after_scheme, |(_, rest)| rest);
    after_user.split('/').next().unwrap_or_default().to_owned()
}

/// The tests' PostgreSQL address.
pub fn database_addr() -> SocketAddr {
    use std::net::ToSocketAddrs;
    let authority = database_authority();
    authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("cannot resolve PostgreSQL's address {authority}"))
}

/// The tests' PostgreSQL URL, reached through `addr` instead.
pub fn database_url_via(addr: SocketAddr) -> String {
    database_url().replacen(&database_authority(), &addr.to_string(), 1)
}
