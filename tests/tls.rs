//! HTTPS on the listeners with gunicorn's flags (`--certfile`, `--keyfile`, `--ca-certs`,
//! `--cert-reqs`), tried with curl against certificates made here with openssl: the guest sees
//! `https`, a plain-HTTP client and a client without an accepted certificate get no answer, and
//! bad TLS settings are refused at start with the flag named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blackbox::{HostProcess, Ready, cache_dir, free_port, guest, host_bin};
use serde_json::Value;

/// Runs openssl with `args` in `dir`, which must succeed.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cannot run openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A new P-256 key `name`.key and, for the subject `name`, a certificate request in `out`, or
/// with `self_signed` a self-signed certificate there.
fn key_and_request(dir: &Path, name: &str, out: &str, self_signed: bool) {
    let key = format!("{name}.key");
    let subject = format!("/CN={name}");
    let mut args = vec!["req"];
    if self_signed {
        args.extend(["-x509", "-days", "2"]);
    }
    args.extend([
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        out,
        "-subj",
        &subject,
    ]);
    openssl(dir, &args);
}

/// A self-signed CA: `ca`.pem and `ca`.key.
fn make_ca(dir: &Path, ca: &str) {
    key_and_request(dir, ca, &format!("{ca}.pem"), true);
}

/// `name`.pem and `name`.key, signed by `ca`, with the X.509 `extension` lines.
fn make_signed(dir: &Path, ca: &str, name: &str, extension: &str) {
    key_and_request(dir, name, &format!("{name}.csr"), false);
    std::fs::write(dir.join(format!("{name}.ext")), extension).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// ca (server and a client), and a stranger CA with a client of its own.
fn certificates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    make_ca(dir.path(), "ca");
    make_ca(dir.path(), "stranger-ca");
    make_signed(
        dir.path(),
        "ca",
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    make_signed(dir.path(), "ca", "client", "extendedKeyUsage=clientAuth\n");
    make_signed(
        dir.path(),
        "stranger-ca",
        "stranger",
        "extendedKeyUsage=clientAuth\n",
    );
    dir
}

struct TlsHost {
    host: HostProcess,
    port: u16,
    certs: PathBuf,
}

/// The faults guest over HTTPS on a free port, and on a plain unix socket the test waits on.
fn start(certs: &Path, extra: &[&str]) -> TlsHost {
    let port = free_port();
    let socket = certs.join("host.sock");
    let path = |name: &str| certs.join(name).to_string_lossy().into_owned();
    let mut args: Vec<String> = vec![
        "serve".into(),
        guest("faults"),
        "--bind".into(),
        format!("unix:{}", socket.display()),
        "--bind".into(),
        format!("127.0.0.1:{port}"),
        "--cache-dir".into(),
        cache_dir().to_string_lossy().into_owned(),
        "--data-dir".into(),
        path("data"),
        "--certfile".into(),
        path("server.pem"),
        "--keyfile".into(),
        path("server.key"),
    ];
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let host = HostProcess::spawn(&args, &[], Ready::Unix(socket));
    TlsHost {
        host,
        port,
        certs: certs.to_owned(),
    }
}

impl TlsHost {
    /// curl to `scheme://127.0.0.1:port/info`, trusting the test CA, with `extra` arguments.
    fn curl(&self, scheme: &str, extra: &[&str]) -> Output {
        self.curl_trusting("ca.pem", scheme, extra)
    }

    /// curl to `scheme://127.0.0.1:port/info`, trusting only the CA in `ca`.
    fn curl_trusting(&self, ca: &str, scheme: &str, extra: &[&str]) -> Output {
        Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
            .arg(self.certs.join(ca))
            .args(extra)
            .arg(format!("{scheme}://127.0.0.1:{}/info", self.port))
            .current_dir(&self.certs)
            .output()
            .expect("cannot run curl")
    }

    /// curl over HTTPS with `extra` gets no answer.
    fn refuses(&self, extra: &[&str], what: &str) {
        let output = self.curl("https", extra);
        assert!(!output.status.success(), "{what} was let in: {output:?}");
    }

    /// Clients refused at the handshake are their failures: nothing is logged as the host's.
    fn assert_nothing_went_wrong(&self) {
        let log = self.host.log();
        assert!(
            !log.contains("[WARNING]") && !log.contains("[ERROR]"),
            "{log}"
        );
    }
}

fn info(output: &Output) -> Value {
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "curl failed: {}{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
}

fn header<'a>(info: &'a Value, name: &str) -> Option<&'a str> {
    info["headers"]
        .as_array()?
        .iter()
        .find(|pair| {
            pair[0]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .and_then(|pair| pair[1].as_str())
}

#[test]
fn https_is_served_and_the_guest_sees_https() {
    let certs = certificates();
    let tls = start(certs.path(), &[]);
    let answer = info(&tls.curl("https", &[]));
    assert_eq!(answer["scheme"], "https", "{answer}");
    assert_eq!(
        header(&answer, "x-forwarded-proto"),
        Some("https"),
        "{answer}"
    );
    // A client that says it is a proxy on https is not believed over plain text: here the
    // host itself ended TLS, whatever the client claims.
    let claimed = info(&tls.curl("https", &["-H", "X-Forwarded-Proto: http"]));
    assert_eq!(header(&claimed, "x-forwarded-proto"), Some("https"));
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = tls.curl("http", &[]);
    assert!(!plain.status.success(), "{plain:?}");
    let log = tls.host.log();
    assert!(
        log.contains(&format!("Listening at: https://127.0.0.1:{}", tls.port)),
        "{log}"
    );
    tls.assert_nothing_went_wrong();
}

#[test]
fn a_required_client_certificate_is_checked_against_the_ca() {
    let certs = certificates();
    let tls = start(
        certs.path(),
        &[
            "--ca-certs",
            &certs.path().join("ca.pem").to_string_lossy(),
            "--cert-reqs",
            "2",
        ],
    );
    tls.refuses(&[], "no certificate");
    tls.refuses(
        &["--cert", "stranger.pem", "--key", "stranger.key"],
        "another CA's certificate",
    );
    let answer = info(&tls.curl("https", &["--cert", "client.pem", "--key", "client.key"]));
    assert_eq!(answer["scheme"], "https");
    tls.assert_nothing_went_wrong();
}

#[test]
fn an_optional_client_certificate_may_be_left_out() {
    let certs = certificates();
    let ca = certs.path().join("ca.pem").to_string_lossy().into_owned();
    let tls = start(certs.path(), &["--ca-certs", &ca, "--cert-reqs", "1"]);
    assert_eq!(info(&tls.curl("https", &[]))["scheme"], "https");
    tls.refuses(
        &["--cert", "stranger.pem", "--key", "stranger.key"],
        "a certificate of another CA, given",
    );
}

#[test]
fn bad_tls_settings_are_refused_at_start_with_the_flag_named() {
    let certs = certificates();
    let path = |name: &str| certs.path().join(name).to_string_lossy().into_owned();
    let refused = |args: &[String], expected: &str| {
        let output = Command::new(host_bin())
            .args(["serve", &guest("faults"), "--check-config", "--cache-dir"])
            .arg(cache_dir())
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };
    refused(&["--certfile".into(), path("missing.pem")], "--certfile");
    // The key of another certificate.
    refused(
        &[
            "--certfile".into(),
            path("server.pem"),
            "--keyfile".into(),
            path("client.key"),
        ],
        "do not make a certificate and its key",
    );
    refused(
        &[
            "--certfile".into(),
            path("server.pem"),
            "--keyfile".into(),
            path("server.key"),
            "--cert-reqs".into(),
            "2".into(),
        ],
        "--ca-certs",
    );
}

#[test]
fn a_client_that_never_finishes_its_handshake_is_dropped_and_holds_up_no_one() {
    use std::io::Read;
    let certs = certificates();
    let tls = start(certs.path(), &[]);
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", tls.port)).unwrap();
    silent
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let opened = std::time::Instant::now();
    // A neighbour is served while the silent client waits.
    assert_eq!(info(&tls.curl("https", &[]))["scheme"], "https");
    let mut byte = [0u8; 1];
    let read = silent.read(&mut byte);
    let held = opened.elapsed();
    assert!(
        matches!(read, Ok(0) | Err(_)) && held < std::time::Duration::from_secs(15),
        "the silent client was still connected after {held:?}: {read:?}"
    );
    assert!(
        held >= std::time::Duration::from_secs(9),
        "dropped after {held:?}, before the handshake timeout (10 s)"
    );
    tls.assert_nothing_went_wrong();
}

#[test]
fn hup_serves_a_renewed_certificate() {
    let certs = certificates();
    let tls = start(certs.path(), &[]);
    // A certificate from another CA put in place of the served one, as a renewal does.
    make_ca(certs.path(), "renewed-ca");
    make_signed(
        certs.path(),
        "renewed-ca",
        "renewed",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    for (from, to) in [("renewed.pem", "server.pem"), ("renewed.key", "server.key")] {
        std::fs::copy(certs.path().join(from), certs.path().join(to)).unwrap();
    }
    let renewed = || tls.curl_trusting("renewed-ca.pem", "https", &[]);
    assert!(!renewed().status.success(), "served before the HUP");
    tls.host.signal(libc::SIGHUP);
    let served = blackbox::poll_until(
        std::time::Duration::from_secs(20),
        std::time::Duration::from_millis(100),
        || renewed().status.success().then_some(()),
    );
    assert!(
        served.is_some(),
        "the renewed certificate was not served after HUP:\n{}",
        tls.host.log()
    );
    tls.assert_nothing_went_wrong();
}
