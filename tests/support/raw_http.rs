//! Raw HTTP/1.1 exchanges, for requests a normal client will not send, and a look at
//! loopback sockets in /proc/net/tcp to know when the host has read a request.

use super::*;

pub(crate) trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A stream a raw exchange can run over.
pub trait RawStream: Read + Write {
    fn set_timeout(&self, timeout: Duration) -> io::Result<()>;
}

impl RawStream for TcpStream {
    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

impl RawStream for UnixStream {
    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

/// One HTTP response as read off the socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The server closed the connection (EOF or reset) within 5 s after the response.
    pub closed_by_server: bool,
}

impl RawResponse {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether a `Connection` header says `close`.
    pub fn says_connection_close(&self) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .any(|(_, v)| {
                v.split(',')
                    .any(|token| token.trim().eq_ignore_ascii_case("close"))
            })
    }
}

/// Connects to `addr`, sends `bytes`, reads one response, then waits up to 5 s for the server to
/// close the connection.
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect_timeout(&addr, RAW_READ_TIMEOUT)
        .unwrap_or_else(|error| panic!("cannot connect to {addr}: {error}"));
    raw_exchange(&mut stream, bytes)
}

/// Like `raw_request`, without waiting for the server to close the connection afterwards
/// (`closed_by_server` stays false): for requests expected to succeed on a keep-alive connection.
pub fn raw_answer(addr: SocketAddr, bytes: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect_timeout(&addr, RAW_READ_TIMEOUT)
        .unwrap_or_else(|error| panic!("cannot connect to {addr}: {error}"));
    stream
        .set_timeout(RAW_READ_TIMEOUT)
        .expect("cannot set a read timeout");
    let written = stream.write_all(bytes).and_then(|()| stream.flush());
    read_response(&mut stream).unwrap_or_else(|error| {
        panic!("no HTTP response to a raw request (write: {written:?}): {error}")
    })
}

/// `raw_request` over a unix socket.
pub fn raw_request_unix(path: &Path, bytes: &[u8]) -> RawResponse {
    let mut stream = UnixStream::connect(path)
        .unwrap_or_else(|error| panic!("cannot connect to unix:{}: {error}", path.display()));
    raw_exchange(&mut stream, bytes)
}

/// Sends `bytes`, reads one response, then waits up to 5 s for the server to close the connection.
pub fn raw_exchange<S: RawStream>(stream: &mut S, bytes: &[u8]) -> RawResponse {
    stream
        .set_timeout(RAW_READ_TIMEOUT)
        .expect("cannot set a read timeout");
    // A server may answer and close before reading everything (an oversized request); the
    // answer is what matters, so a failed write is not an error by itself.
    let written = stream.write_all(bytes).and_then(|()| stream.flush());
    let mut response = match read_response(stream) {
        Ok(response) => response,
        Err(error) => panic!("no HTTP response to a raw request (write: {written:?}): {error}"),
    };
    response.closed_by_server = wait_closed(stream, RAW_CLOSE_TIMEOUT);
    response
}

/// Whether the peer closes the stream (EOF or reset) within `timeout`; bytes that arrive in the
/// meantime are read and dropped.
pub fn wait_closed<S: RawStream>(stream: &mut S, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        if stream.set_timeout(left).is_err() {
            return false;
        }
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error) => match error.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => {
                    return true;
                }
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => continue,
                _ => return true,
            },
        }
    }
}

/// Reads one HTTP/1.x response (content-length, chunked, or until EOF), leaving
/// `closed_by_server` false.
pub fn read_response<R: Read>(stream: &mut R) -> io::Result<RawResponse> {
    let mut reader = BufferedReader {
        inner: stream,
        buffer: Vec::new(),
        position: 0,
    };
    let status_line = reader.read_line()?;
    let status_line = String::from_utf8_lossy(&status_line).into_owned();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an HTTP/1 status line: {status_line:?}"),
        ));
    }
    let status: u16 = parts
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        let line = reader.read_line()?;
        if line.is_empty() {
            break;
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        let (name, value) = line.split_once(':').ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad header line {line:?}"),
            )
        })?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        Vec::new()
    } else if header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let line = String::from_utf8_lossy(&reader.read_line()?).into_owned();
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            if size == 0 {
                while !reader.read_line()?.is_empty() {}
                break;
            }
            body.extend_from_slice(&reader.read_exact(size)?);
            reader.read_line()?;
        }
        body
    } else if let Some(length) = header("content-length") {
        let length: usize = length.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad content-length {length:?}"),
            )
        })?;
        reader.read_exact(length)?
    } else {
        reader.read_to_end()?
    };
    Ok(RawResponse {
        status,
        headers,
        body,
        closed_by_server: false,
    })
}

struct BufferedReader<'a, R> {
    inner: &'a mut R,
    buffer: Vec<u8>,
    position: usize,
}

impl<R: Read> BufferedReader<'_, R> {
    /// Reads more bytes into the buffer; false at EOF.
    fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.inner.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buffer.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// One line without its CRLF.
    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(end) = self.buffer[self.position..]
                .windows(2)
                .position(|w| w == b"\r\n")
            {
                let line = self.buffer[self.position..self.position + end].to_vec();
                self.position += end + 2;
                return Ok(line);
            }
            if !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-line",
                ));
            }
        }
    }

    fn read_exact(&mut self, length: usize) -> io::Result<Vec<u8>> {
        while self.buffer.len() - self.position < length {
            if !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} of {length} body bytes",
                        self.buffer.len() - self.position
                    ),
                ));
            }
        }
        let bytes = self.buffer[self.position..self.position + length].to_vec();
        self.position += length;
        Ok(bytes)
    }

    fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        loop {
            match self.fill() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(error) if error.kind() == io::ErrorKind::ConnectionReset => break,
                Err(error) => return Err(error),
            }
        }
        let bytes = self.buffer[self.position..].to_vec();
        self.position = self.buffer.len();
        Ok(bytes)
    }
}

/// `GET <target> HTTP/1.1` with a Host header and `extra_headers` (each `Name: value`), as bytes.
pub fn get_request(target: &str, host: &str, extra_headers: &[String]) -> Vec<u8> {
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n");
    for header in extra_headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// The send and receive queues of one loopback TCP socket, from /proc/net/tcp.
fn tcp_queues(local_port: u16, remote_port: u16) -> Option<(u64, u64)> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |field: &str| {
        field
            .rsplit_once(':')
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 || port(fields[1])? != local_port || port(fields[2])? != remote_port {
            return None;
        }
        let (tx, rx) = fields[4].split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

/// Waits until the server end of a loopback connection has read everything sent on `client`:
/// the client socket has nothing unacknowledged and the server socket nothing unread. This is how
/// a test knows a request is in the host's hands (in flight or queued) without sleeping.
pub fn wait_until_server_read(client: &TcpStream, timeout: Duration) -> bool {
    let local = client
        .local_addr()
        .expect("a connected socket has a local address")
        .port();
    let remote = client
        .peer_addr()
        .expect("a connected socket has a peer")
        .port();
    poll_until(timeout, Duration::from_millis(5), || {
        let (client_unacked, _) = tcp_queues(local, remote)?;
        let (_, server_unread) = tcp_queues(remote, local)?;
        (client_unacked == 0 && server_unread == 0).then_some(())
    })
    .is_some()
}

/// Sends `GET target` on a new connection and returns once the host has read it (the request is
/// in flight or queued); the response can then be read from the stream.
pub fn send_in_flight(addr: SocketAddr, target: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("cannot connect");
    stream
        .write_all(&get_request(target, &addr.to_string(), &[]))
        .expect("cannot send the request");
    assert!(
        wait_until_server_read(&stream, Duration::from_secs(10)),
        "the host did not read {target} within 10 s"
    );
    stream
}
