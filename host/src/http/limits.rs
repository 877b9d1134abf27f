//! gunicorn's request limits: `--limit-request-line`, `--limit-request-fields`,
//! `--limit-request-field_size`, with its clamping rules and answers.
//!
//! hyper parses the request. The header-count limit is handed to hyper (it answers 431 with
//! `Connection: close`, without a body); the line and field-size limits are checked here on the
//! parsed request, so that those answers say which limit was hit.

use hyper::{Method, StatusCode, Uri, Version};

/// gunicorn's ceiling for the request line.
const MAX_REQUEST_LINE: usize = 8190;
/// gunicorn's ceiling for the number of header fields.
const MAX_HEADER_FIELDS: usize = 32768;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RequestLimits {
    /// Longest request line in bytes, without its CRLF. `None` = unlimited.
    pub request_line: Option<usize>,
    /// Most header fields in one request.
    pub header_fields: usize,
    /// Longest header line (`name: value`) in bytes. `None` = unlimited.
    pub header_field_size: Option<usize>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct LimitExceeded {
    pub status: StatusCode,
    pub message: String,
}

impl RequestLimits {
    /// The limits as gunicorn derives them from its three settings.
    pub fn gunicorn(
        request_line: i64,
        header_fields: i64,
        header_field_size: i64,
    ) -> RequestLimits {
        RequestLimits {
            request_line: match request_line {
                n if n <= 0 => None,
                n => Some((n as usize).min(MAX_REQUEST_LINE)),
            },
            header_fields: match header_fields {
                n if n <= 0 => MAX_HEADER_FIELDS,
                n => (n as usize).min(MAX_HEADER_FIELDS),
            },
            header_field_size: match header_field_size {
                n if n <= 0 => None,
                n => Some(n as usize),
            },
        }
    }

    /// The most bytes a request head can take within these limits; hyper's read buffer is sized
    /// to it so that any head the limits allow can be parsed, and a larger one is refused (431).
    pub fn head_buffer_size(&self) -> usize {
        let line = self.request_line.unwrap_or(MAX_REQUEST_LINE) + 2;
        let field = self.header_field_size.unwrap_or(MAX_REQUEST_LINE) + 2;
        let head = line.saturating_add(self.header_fields.saturating_mul(field)) + 2;
        head.clamp(16 * 1024, 64 * 1024 * 1024)
    }

    /// The limits that let through what any of `all` lets through: what the connection's
    /// parser must accept, before a request is routed to its app.
    pub fn loosest(all: impl IntoIterator<Item = RequestLimits>) -> RequestLimits {
        let loosest = |a: Option<usize>, b: Option<usize>| a.zip(b).map(|(a, b)| a.max(b));
        all.into_iter()
            .reduce(|a, b| RequestLimits {
                request_line: loosest(a.request_line, b.request_line),
                header_fields: a.header_fields.max(b.header_fields),
                header_field_size: loosest(a.header_field_size, b.header_field_size),
            })
            .unwrap_or(RequestLimits::gunicorn(0, 0, 0))
    }

    /// Checks the number of header fields the client sent. hyper counts them against the
    /// loosest app's limit while parsing; an app's own is checked once the request is routed.
    /// Checks a parsed request, as the client sent it, against the line, field-count and
    /// field-size limits.
    pub fn check(
        &self,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &hyper::HeaderMap,
    ) -> Result<(), LimitExceeded> {
        if headers.len() > self.header_fields {
            return Err(LimitExceeded {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                message: format!(
                    "too many header fields: {}, the limit is {} (--limit-request-fields)",
                    headers.len(),
                    self.header_fields
                ),
            });
        }
        if let Some(limit) = self.request_line {
            let line = request_line_length(method, uri, version);
            if line > limit {
                return Err(LimitExceeded {
                    status: StatusCode::BAD_REQUEST,
                    message: format!(
                        "request line too long: {line} bytes, the limit is {limit} (--limit-request-line)"
                    ),
                });
            }
        }
        if let Some(limit) = self.header_field_size {
            for (name, value) in headers {
                let line = name.as_str().len() + 2 + value.len();
                if line > limit {
                    return Err(LimitExceeded {
                        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        message: format!(
                            "header field {name} too large: {line} bytes, the limit is {limit} (--limit-request-field_size)"
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// `METHOD SP request-target SP HTTP/x.y`, as the client sent it.
fn request_line_length(method: &Method, uri: &Uri, version: Version) -> usize {
    // An origin-form target keeps the client's bytes; other forms print back as sent.
    let target = match (uri.scheme(), uri.path_and_query()) {
        (None, Some(path_and_query)) => path_and_query.as_str().len(),
        _ => uri.to_string().len(),
    };
    let version = match version {
        Version::HTTP_09 => 0,
        _ => " HTTP/1.1".len(),
    };
    method.as_str().len() + 1 + target + version
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gunicorn_clamping_rules() {
        let defaults = RequestLimits::gunicorn(4094, 100, 8190);
        assert_eq!(defaults.request_line, Some(4094));
        assert_eq!(RequestLimits::gunicorn(0, 0, 0).request_line, None);
        assert_eq!(
            RequestLimits::gunicorn(100_000, 100, 8190).request_line,
            Some(8190)
        );
        assert_eq!(RequestLimits::gunicorn(4094, -1, 8190).header_fields, 32768);
        assert_eq!(
            RequestLimits::gunicorn(4094, 40_000, 8190).header_fields,
            32768
        );
        assert_eq!(
            RequestLimits::gunicorn(4094, 100, 0).header_field_size,
            None
        );
    }

    #[test]
    fn request_line_counts_every_byte() {
        let limits = RequestLimits::gunicorn(30, 100, 8190);
        let uri: Uri = "/abcdefghijklmnop".parse().unwrap();
        // "GET /abcdefghijklmnop HTTP/1.1" is 30 bytes.
        assert!(
            limits
                .check(&Method::GET, &uri, Version::HTTP_11, &Default::default())
                .is_ok()
        );
        let uri: Uri = "/abcdefghijklmnopq".parse().unwrap();
        let err = limits
            .check(&Method::GET, &uri, Version::HTTP_11, &Default::default())
            .unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn header_line_is_name_colon_space_value() {
        let limits = RequestLimits::gunicorn(4094, 100, 10);
        let mut headers = hyper::HeaderMap::new();
        headers.insert("abc", "12345".parse().unwrap()); // "abc: 12345" = 10
        assert!(
            limits
                .check(
                    &Method::GET,
                    &"/".parse().unwrap(),
                    Version::HTTP_11,
                    &headers
                )
                .is_ok()
        );
        headers.insert("abc", "123456".parse().unwrap());
        let err = limits
            .check(
                &Method::GET,
                &"/".parse().unwrap(),
                Version::HTTP_11,
                &headers,
            )
            .unwrap_err();
        assert_eq!(err.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
}
