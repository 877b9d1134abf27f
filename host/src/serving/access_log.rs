//! The access log, in gunicorn's `--access-logformat` language (`%(h)s %(r)s …`). A line is
//! written when the response body has been sent (or abandoned), so `%(b)s` is what the client
//! really got and `%(D)s` covers the whole response.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderName, REFERER, USER_AGENT};
use hyper::{HeaderMap, Request, Response, Version};

use crate::http::answers::ResponseBody;
use crate::logging::LogFile;

pub struct AccessLog {
    parts: Vec<Part>,
    out: LogFile,
}

enum Part {
    Literal(String),
    Atom(Atom),
}

enum Atom {
    RemoteAddress,
    Dash,
    User,
    Time,
    RequestLine,
    Method,
    Path,
    Query,
    Protocol,
    Status,
    BytesOrZero,
    BytesOrDash,
    Referer,
    UserAgent,
    Seconds,
    Micros,
    Millis,
    SecondsDecimal,
    Pid,
    RequestHeader(HeaderName),
    ResponseHeader(HeaderName),
    Environment(String),
    Unknown,
}

/// What one request's line is made of.
pub struct AccessRecord {
    remote: String,
    method: String,
    path: String,
    query: String,
    version: Version,
    request_headers: HeaderMap,
    status: u16,
    response_headers: HeaderMap,
    received: time::OffsetDateTime,
    started: Instant,
}

impl AccessLog {
    pub fn new(format: &str, out: LogFile) -> AccessLog {
        AccessLog {
            parts: parse(format),
            out,
        }
    }

    pub fn reopen(&self) -> anyhow::Result<()> {
        self.out.reopen()
    }

    pub fn record<B>(&self, request: &Request<B>, remote: &str) -> AccessRecord {
        AccessRecord {
            remote: remote.to_owned(),
            method: request.method().to_string(),
            path: request.uri().path().to_owned(),
            query: request.uri().query().unwrap_or_default().to_owned(),
            version: request.version(),
            request_headers: request.headers().clone(),
            status: 0,
            response_headers: HeaderMap::new(),
            received: time::OffsetDateTime::now_utc(),
            started: Instant::now(),
        }
    }

    /// Wraps the response body so the line is written once the body is done.
    pub fn observe(
        self: &std::sync::Arc<Self>,
        mut record: AccessRecord,
        response: Response<ResponseBody>,
    ) -> Response<ResponseBody> {
        record.status = response.status().as_u16();
        record.response_headers = response.headers().clone();
        let log = std::sync::Arc::clone(self);
        response.map(|body| {
            http_body_util::BodyExt::boxed_unsync(LoggedBody {
                inner: body,
                sent: 0,
                finished: Some(Box::new(move |sent| log.write(&record, sent))),
            })
        })
    }

    fn write(&self, record: &AccessRecord, sent: u64) {
        let mut line = String::with_capacity(160);
        for part in &self.parts {
            match part {
                Part::Literal(text) => line.push_str(text),
                Part::Atom(atom) => {
                    let _ = record.render(atom, sent, &mut line);
                }
            }
        }
        line.push('\n');
        self.out.write_line(line.as_bytes());
    }
}

impl AccessRecord {
    /// Writing to a `String` cannot fail; the result is only there for `?` and `write!`.
    fn render(&self, atom: &Atom, sent: u64, out: &mut String) -> std::fmt::Result {
        use std::fmt::Write;
        let elapsed = self.started.elapsed();
        let header =
            |out: &mut String, headers: &HeaderMap, name: &HeaderName| match headers.get(name) {
                Some(value) => escape(out, value.as_bytes()),
                None => out.write_str("-"),
            };
        match atom {
            Atom::RemoteAddress => write!(out, "{}", self.remote),
            Atom::Dash | Atom::Unknown => write!(out, "-"),
            Atom::User => match basic_auth_user(&self.request_headers) {
                Some(user) => escape(out, &user),
                None => out.write_str("-"),
            },
            Atom::Time => write!(out, "[{}]", apache_time(self.received)),
            Atom::RequestLine => {
                escape(out, self.method.as_bytes())?;
                out.push(' ');
                escape(out, self.path.as_bytes())?;
                if !self.query.is_empty() {
                    out.push('?');
                    escape(out, self.query.as_bytes())?;
                }
                write!(out, " {}", protocol(self.version))
            }
            Atom::Method => escape(out, self.method.as_bytes()),
            Atom::Path => escape(out, self.path.as_bytes()),
            Atom::Query => escape(out, self.query.as_bytes()),
            Atom::Protocol => write!(out, "{}", protocol(self.version)),
            Atom::Status => write!(out, "{}", self.status),
            Atom::BytesOrZero => write!(out, "{sent}"),
            Atom::BytesOrDash if sent == 0 => write!(out, "-"),
            Atom::BytesOrDash => write!(out, "{sent}"),
            Atom::Referer => header(out, &self.request_headers, &REFERER),
            Atom::UserAgent => header(out, &self.request_headers, &USER_AGENT),
            Atom::Seconds => write!(out, "{}", elapsed.as_secs()),
            Atom::Micros => write!(out, "{}", elapsed.as_micros()),
            Atom::Millis => write!(out, "{}", elapsed.as_millis()),
            Atom::SecondsDecimal => write!(out, "{:.6}", elapsed.as_secs_f64()),
            Atom::Pid => write!(out, "<{}>", std::process::id()),
            Atom::RequestHeader(name) => header(out, &self.request_headers, name),
            Atom::ResponseHeader(name) => header(out, &self.response_headers, name),
            Atom::Environment(name) => match std::env::var(name) {
                Ok(value) => escape(out, value.as_bytes()),
                Err(_) => out.write_str("-"),
            },
        }
    }
}

/// Appends a value a client or an app controls, escaped as Apache's `mod_log_config` does: a
/// quote or backslash gets a backslash, and every byte that is not printable ASCII (control
/// characters, so a forged line break, and bytes beyond ASCII) is written `\xNN`. A line of the
/// access log is then always one line, and a quoted atom stays one field.
fn escape(out: &mut String, bytes: &[u8]) -> std::fmt::Result {
    use std::fmt::Write;
    for &byte in bytes {
        match byte {
            b'"' => out.write_str("\\\"")?,
            b'\\' => out.write_str("\\\\")?,
            0x20..=0x7e => out.write_char(char::from(byte))?,
            _ => write!(out, "\\x{byte:02x}")?,
        }
    }
    Ok(())
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        _ => "HTTP/1.1",
    }
}

/// `24/Nov/2026:03:24:47 +0000`, gunicorn's `%(t)s` (in UTC).
fn apache_time(at: time::OffsetDateTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{:02}/{}/{:04}:{:02}:{:02}:{:02} +0000",
        at.day(),
        MONTHS[usize::from(u8::from(at.month())) - 1],
        at.year(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// The user name of `Authorization: Basic`, as the client sent it (any bytes: it is escaped
/// when written).
fn basic_auth_user(headers: &HeaderMap) -> Option<Vec<u8>> {
    use base64::Engine;
    let value = headers.get(hyper::header::AUTHORIZATION)?.as_bytes();
    let (scheme, encoded) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let mut decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim_ascii())
        .ok()?;
    if let Some(colon) = decoded.iter().position(|&byte| byte == b':') {
        decoded.truncate(colon);
    }
    Some(decoded)
}

fn parse(format: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut rest = format;
    while let Some(start) = rest.find("%(") {
        let Some(length) = rest[start..].find(")s") else {
            break;
        };
        if start > 0 {
            parts.push(Part::Literal(rest[..start].to_owned()));
        }
        parts.push(Part::Atom(atom(&rest[start + 2..start + length])));
        rest = &rest[start + length + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_owned()));
    }
    parts
}

fn atom(name: &str) -> Atom {
    let braced = |suffix: &str| {
        name.strip_prefix('{')
            .and_then(|inner| inner.strip_suffix(suffix))
            .map(str::to_ascii_lowercase)
    };
    if let Some(header) = braced("}i").and_then(|h| HeaderName::try_from(h).ok()) {
        return Atom::RequestHeader(header);
    }
    if let Some(header) = braced("}o").and_then(|h| HeaderName::try_from(h).ok()) {
        return Atom::ResponseHeader(header);
    }
    if let Some(variable) = name
        .strip_prefix('{')
        .and_then(|inner| inner.strip_suffix("}e"))
    {
        return Atom::Environment(variable.to_owned());
    }
    match name {
        "h" => Atom::RemoteAddress,
        "l" => Atom::Dash,
        "u" => Atom::User,
        "t" => Atom::Time,
        "r" => Atom::RequestLine,
        "m" => Atom::Method,
        "U" => Atom::Path,
        "q" => Atom::Query,
        "H" => Atom::Protocol,
        "s" => Atom::Status,
        "B" => Atom::BytesOrZero,
        "b" => Atom::BytesOrDash,
        "f" => Atom::Referer,
        "a" => Atom::UserAgent,
        "T" => Atom::Seconds,
        "D" => Atom::Micros,
        "M" => Atom::Millis,
        "L" => Atom::SecondsDecimal,
        "p" => Atom::Pid,
        _ => Atom::Unknown,
    }
}

struct LoggedBody {
    inner: ResponseBody,
    sent: u64,
    finished: Option<Box<dyn FnOnce(u64) + Send>>,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            this.sent += data.len() as u64;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(finished) = self.finished.take() {
            finished(self.sent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gunicorn_default_format_parses_into_atoms_and_literals() {
        let parts = parse(crate::settings::DEFAULT_ACCESS_LOG_FORMAT);
        let atoms = parts.iter().filter(|p| matches!(p, Part::Atom(_))).count();
        assert_eq!(atoms, 9);
        assert!(matches!(parts[0], Part::Atom(Atom::RemoteAddress)));
    }

    #[test]
    fn client_values_are_escaped_onto_one_line() {
        let mut out = String::new();
        escape(&mut out, b"a\"b\\c\nd\te\x7f\xc3\xa9").unwrap();
        assert_eq!(out, r#"a\"b\\c\x0ad\x09e\x7f\xc3\xa9"#);
    }

    #[test]
    fn basic_auth_user_keeps_every_byte() {
        use base64::Engine;
        let mut headers = HeaderMap::new();
        let credentials = base64::engine::general_purpose::STANDARD.encode("eve\nforged:secret");
        headers.insert(
            hyper::header::AUTHORIZATION,
            format!("BASIC {credentials}").parse().unwrap(),
        );
        assert_eq!(basic_auth_user(&headers).unwrap(), b"eve\nforged");
    }

    #[test]
    fn time_is_apache_style() {
        let at = time::macros::datetime!(2026-11-24 03:04:05 UTC);
        assert_eq!(apache_time(at), "24/Nov/2026:03:04:05 +0000");
    }
}
