//! Small HTTP helpers shared by the guests, on top of `wasip2`'s `wasi:http` bindings: the
//! request's path, query and headers; its body read whole or handed on as a stream; answers
//! with a body, JSON, or a stream spliced through inside the host.

// The one property-target runner of the project, shared with the black-box tests.
#[cfg(test)]
#[path = "../../../tests/support/fuzzing.rs"]
mod fuzzing;
mod range;

pub use range::{Unsatisfiable, byte_range};

use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasip2::io::streams::{InputStream, OutputStream, StreamError};

/// The largest piece read or spliced at once.
pub const CHUNK: u64 = 256 * 1024;

/// A request, taken apart.
pub struct Request {
    pub method: Method,
    pub path: String,
    query: Vec<(String, String)>,
    inner: IncomingRequest,
}

impl Request {
    pub fn new(inner: IncomingRequest) -> Request {
        let path_with_query = inner.path_with_query().unwrap_or_default();
        let (path, query) = path_with_query
            .split_once('?')
            .unwrap_or((&path_with_query, ""));
        Request {
            method: inner.method(),
            path: path.to_owned(),
            query: query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(key), percent_decode(value))
                })
                .collect(),
            inner,
        }
    }

    /// A query parameter, decoded.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The first value of a header, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.inner
            .headers()
            .get(name)
            .into_iter()
            .next()
            .map(|value| String::from_utf8_lossy(&value).into_owned())
    }

    /// The declared body length.
    pub fn content_length(&self) -> Option<u64> {
        content_length(&self.inner.headers())
    }

    /// The body as a stream (with the body resource, which must outlive the stream).
    pub fn body_stream(&self) -> Option<(IncomingBody, InputStream)> {
        let body = self.inner.consume().ok()?;
        let stream = body.stream().ok()?;
        Some((body, stream))
    }

    /// The whole body, up to `limit` bytes; `None` if it is larger or cannot be read.
    pub fn body(&self, limit: usize) -> Option<Vec<u8>> {
        let (_body, stream) = self.body_stream()?;
        let mut bytes = Vec::new();
        loop {
            match stream.blocking_read(CHUNK) {
                Ok(chunk) => {
                    bytes.extend(chunk);
                    if bytes.len() > limit {
                        return None;
                    }
                }
                Err(StreamError::Closed) => return Some(bytes),
                Err(StreamError::LastOperationFailed(_)) => return None,
            }
        }
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => match bytes.get(index + 1..index + 3).and_then(hex_byte) {
                Some(byte) => {
                    decoded.push(byte);
                    index += 3;
                }
                // Not a percent-encoded byte: the `%` is itself.
                None => {
                    decoded.push(b'%');
                    index += 1;
                }
            },
            b'+' => {
                decoded.push(b' ');
                index += 1;
            }
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

fn fields(headers: &[(&str, String)]) -> Fields {
    let list: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(name, value)| (name.to_string(), value.clone().into_bytes()))
        .collect();
    Fields::from_list(&list).expect("the guests only send valid headers")
}

/// Sets the response head and returns its body.
fn start(out: ResponseOutparam, status: u16, headers: &[(&str, String)]) -> OutgoingBody {
    let response = OutgoingResponse::new(fields(headers));
    response
        .set_status_code(status)
        .expect("the guests only send valid statuses");
    let body = response.body().expect("a fresh response has a body");
    ResponseOutparam::set(out, Ok(response));
    body
}

/// Answers with `body`.
pub fn respond(out: ResponseOutparam, status: u16, content_type: &str, body: &[u8]) {
    let headers = [
        ("content-type", content_type.to_owned()),
        ("content-length", body.len().to_string()),
    ];
    let outgoing = start(out, status, &headers);
    let stream = outgoing.write().expect("a fresh body has a stream");
    // A client that goes away mid-response is nothing to fail over.
    if write_all(&stream, body)
        .and_then(|()| stream.blocking_flush())
        .is_err()
    {
        return;
    }
    drop(stream);
    let _ = OutgoingBody::finish(outgoing, None);
}

/// Answers with no body at all (204 and the like).
pub fn respond_empty(out: ResponseOutparam, status: u16) {
    let outgoing = start(out, status, &[]);
    let _ = OutgoingBody::finish(outgoing, None);
}

/// Answers with JSON.
pub fn respond_json(out: ResponseOutparam, status: u16, body: &serde_json::Value) {
    let mut text = body.to_string();
    text.push('\n');
    respond(out, status, "application/json", text.as_bytes());
}

/// Answers with the bytes of `source`, spliced to the client inside the host. If the source
/// fails midway the body is left unfinished, so the client sees a broken response, never a
/// short one that looks whole; the error says why.
pub fn respond_stream(
    out: ResponseOutparam,
    status: u16,
    headers: &[(&str, String)],
    source: InputStream,
) -> Result<(), String> {
    let declared = declared_length(headers);
    splice(source, start(out, status, headers), declared)
}

/// Answers with the bytes of each source in turn, each made only once the one before is sent,
/// spliced to the client inside the host. If a source cannot be made or fails midway the body
/// is left unfinished, as with `respond_stream`; the error says why.
pub fn respond_streams(
    out: ResponseOutparam,
    status: u16,
    headers: &[(&str, String)],
    sources: impl IntoIterator<Item = Result<InputStream, String>>,
) -> Result<(), String> {
    let declared = declared_length(headers);
    let body = start(out, status, headers);
    let sink = body
        .write()
        .map_err(|()| "the body has no stream".to_owned())?;
    let mut sent = 0;
    for source in sources {
        sent += splice_to_end(&source?, &sink)?;
    }
    end(body, sink, sent, declared)
}

/// Splices `source` into `body` inside the host to its end, then finishes `body`; `declared`
/// is the body's `Content-Length`, if it has one. On a failure `body` is left unfinished, so
/// the far end sees a cut message, never a short one that looks whole; the error says why.
pub fn splice(
    source: InputStream,
    body: OutgoingBody,
    declared: Option<u64>,
) -> Result<(), String> {
    let sink = body
        .write()
        .map_err(|()| "the body has no stream".to_owned())?;
    let sent = splice_to_end(&source, &sink)?;
    drop(source);
    end(body, sink, sent, declared)
}

/// The `Content-Length` of a head, if it has a valid one.
pub fn content_length(headers: &Fields) -> Option<u64> {
    length(headers.get("content-length").first()?)
}

/// The `Content-Length` among headers the guest is about to send.
fn declared_length(headers: &[(&str, String)]) -> Option<u64> {
    let (_, value) = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))?;
    length(value.as_bytes())
}

fn length(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// Flushes and finishes a body of which `sent` bytes were written. A body of declared length
/// is complete once that many bytes are out: the receiving end may then close its stream
/// without waiting for the rest, and a closed stream is no failure.
fn end(
    body: OutgoingBody,
    sink: OutputStream,
    sent: u64,
    declared: Option<u64>,
) -> Result<(), String> {
    match sink.blocking_flush() {
        Ok(()) => {}
        Err(StreamError::Closed) if declared == Some(sent) => {}
        Err(error) => return Err(format!("{error:?}")),
    }
    // The stream is a child of the body: it goes first.
    drop(sink);
    OutgoingBody::finish(body, None).map_err(|e| format!("{e:?}"))
}

/// Splices all of `source` into `sink`, inside the host, and says how many bytes went. A
/// closed sink also ends it; the flush that follows tells that apart.
fn splice_to_end(source: &InputStream, sink: &OutputStream) -> Result<u64, String> {
    let mut sent = 0;
    loop {
        match sink.blocking_splice(source, CHUNK) {
            Ok(spliced) => sent += spliced,
            Err(StreamError::Closed) => return Ok(sent),
            Err(StreamError::LastOperationFailed(error)) => return Err(error.to_debug_string()),
        }
    }
}

pub fn write_all(stream: &OutputStream, mut data: &[u8]) -> Result<(), StreamError> {
    while !data.is_empty() {
        let permitted = stream.check_write()? as usize;
        if permitted == 0 {
            stream.subscribe().block();
            continue;
        }
        let now = permitted.min(data.len());
        stream.write(&data[..now])?;
        data = &data[now..];
    }
    Ok(())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes().chunks(2).map(hex_byte).collect()
}

/// Two hex digits as a byte. (`u8::from_str_radix` would also take `+f`.)
fn hex_byte(digits: &[u8]) -> Option<u8> {
    let digit = |d: u8| (d as char).to_digit(16);
    match digits {
        [high, low] => Some((digit(*high)? * 16 + digit(*low)?) as u8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing;
    use proptest::prelude::*;

    /// What the targets found: `from_str_radix` takes a leading `+`, so `%+0` decoded to a
    /// NUL byte (instead of `%` and a space) and `+f` was hex.
    #[test]
    fn regressions_found_by_the_target() {
        assert_eq!(percent_decode("%+0"), "% 0");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(unhex("+f"), None);
    }

    /// A query value as a browser encodes it (`application/x-www-form-urlencoded`).
    fn form_encode(text: &str) -> String {
        text.bytes()
            .map(|byte| match byte {
                b' ' => "+".to_owned(),
                b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => (b as char).to_string(),
                b => format!("%{b:02X}"),
            })
            .collect()
    }

    /// The decoding as the WHATWG URL standard states it: `%` and two hex digits is a byte,
    /// any other `%` is itself, `+` is a space.
    fn reference_decode(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let hex_pair = bytes
                .get(i + 1..i + 3)
                .filter(|pair| pair.iter().all(u8::is_ascii_hexdigit));
            match (bytes[i], hex_pair) {
                (b'%', Some(pair)) => {
                    let digit = |d: u8| (d as char).to_digit(16).expect("a hex digit") as u8;
                    out.push(digit(pair[0]) * 16 + digit(pair[1]));
                    i += 3;
                }
                (b'+', _) => {
                    out.push(b' ');
                    i += 1;
                }
                (byte, _) => {
                    out.push(byte);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn query_decoding_inverts_encoding_and_follows_the_standard() {
        let text = prop_oneof![any::<String>(), "[%+0-9a-fA-F\\-xyz]{0,12}"];
        fuzzing::run("query_decoding", 2_000, text, |text| {
            prop_assert_eq!(percent_decode(&form_encode(&text)), text.clone());
            prop_assert_eq!(percent_decode(&text), reference_decode(&text));
            Ok(())
        });
    }

    #[test]
    fn hex_round_trips_and_takes_nothing_else() {
        let input = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..40).prop_map(|bytes| hex(&bytes)),
            "[+\\-0-9a-fA-F ]{0,12}",
            any::<String>(),
        ];
        fuzzing::run("hex", 2_000, input, |text| {
            match unhex(&text) {
                Some(bytes) => prop_assert_eq!(hex(&bytes), text.to_ascii_lowercase()),
                None => prop_assert!(
                    text.len() % 2 == 1 || !text.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{text:?} is hex"
                ),
            }
            Ok(())
        });
    }
}
