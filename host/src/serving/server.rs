//! Listening sockets and HTTP/1.1 connections: gunicorn's `--bind`, `--backlog`,
//! `--reuse-port`, `--keep-alive`, a cap on the connections a worker holds open
//! (`--max-connections`), and a drain on shutdown in which no in-flight request is dropped (they
//! finish with `Connection: close`) and idle connections are closed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::http::accept_failed;
use crate::http::limits::RequestLimits;
use crate::http::write_stall::WriteStallTimeout;
use crate::serving::handler::{Peer, RequestHandler};
use crate::serving::quiet::{Open, Quiet};
use crate::settings::BindAddress;

/// How long a draining worker keeps an idle connection open for a request that may be on its
/// way: the first of a connection it has just accepted, or the next one of a kept-alive one.
const REQUEST_GRACE: Duration = Duration::from_secs(1);

/// The least time between two warnings that the connection cap is reached.
const CAP_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// hyper's stack-allocated header array holds this many; other limits cost a heap allocation.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// A bound, listening socket, before the runtime takes it over.
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix {
        listener: std::os::unix::net::UnixListener,
        path: PathBuf,
    },
}

impl Listener {
    pub fn bind(address: &BindAddress, backlog: u32, reuse_port: bool) -> Result<Listener> {
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        match address {
            BindAddress::Tcp(addr) => {
                let socket = Socket::new(
                    Domain::for_address(*addr),
                    Type::STREAM,
                    Some(Protocol::TCP),
                )
                .context("cannot create a TCP socket")?;
                socket.set_reuse_address(true)?;
                if reuse_port {
                    socket.set_reuse_port(true)?;
                }
                socket
                    .bind(&SockAddr::from(*addr))
                    .with_context(|| format!("cannot bind {addr}"))?;
                socket
                    .listen(backlog)
                    .with_context(|| format!("cannot listen on {addr}"))?;
                socket.set_nonblocking(true)?;
                Ok(Listener::Tcp(socket.into()))
            }
            BindAddress::Unix(path) => {
                remove_stale_socket(path)?;
                let socket = Socket::new(Domain::UNIX, Type::STREAM, None)
                    .context("cannot create a unix socket")?;
                socket
                    .bind(&SockAddr::unix(path)?)
                    .with_context(|| format!("cannot bind unix:{}", path.display()))?;
                socket
                    .listen(backlog)
                    .with_context(|| format!("cannot listen on unix:{}", path.display()))?;
                socket.set_nonblocking(true)?;
                Ok(Listener::Unix {
                    listener: socket.into(),
                    path: path.clone(),
                })
            }
        }
    }

    /// A listener the master bound and passed down as descriptor `fd`.
    ///
    /// # Safety
    /// `fd` must be an open listening socket of the kind `address` names, owned by nobody else
    /// in this process.
    pub unsafe fn inherit(address: &BindAddress, fd: i32) -> Result<Listener> {
        use std::os::fd::FromRawFd;
        let listener = match address {
            BindAddress::Tcp(_) => Listener::Tcp(unsafe { std::net::TcpListener::from_raw_fd(fd) }),
            BindAddress::Unix(path) => Listener::Unix {
                listener: unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) },
                path: path.clone(),
            },
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix { listener, .. } => listener.set_nonblocking(true),
        }
        .with_context(|| format!("inherited listener {address} is unusable"))?;
        Ok(listener)
    }

    pub fn try_clone(&self) -> Result<Listener> {
        Ok(match self {
            Listener::Tcp(listener) => Listener::Tcp(listener.try_clone()?),
            Listener::Unix { listener, path } => Listener::Unix {
                listener: listener.try_clone()?,
                path: path.clone(),
            },
        })
    }

    pub fn as_raw_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        match self {
            Listener::Tcp(listener) => listener.as_raw_fd(),
            Listener::Unix { listener, .. } => listener.as_raw_fd(),
        }
    }

    /// What gunicorn prints in `Listening at: …`.
    pub fn describe(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        match self {
            Listener::Tcp(listener) => match listener.local_addr() {
                Ok(addr) => format!("{scheme}://{addr}"),
                Err(_) => format!("{scheme}://?"),
            },
            Listener::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }
}

/// gunicorn removes a socket file left by a previous run; anything else at the path is kept.
fn remove_stale_socket(path: &PathBuf) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the old socket {}", path.display())),
        Ok(_) => anyhow::bail!(
            "cannot bind unix:{}: a file that is not a socket is there",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}

/// How connections are served.
#[derive(Clone)]
pub struct ConnectionSettings {
    pub keep_alive: Option<Duration>,
    pub limits: RequestLimits,
    /// Connections the worker holds open at once, over all its listeners.
    pub max_connections: usize,
    /// How long a response may wait on a client that reads none of it (the loosest app's
    /// `--timeout`); `None` = as long as the client likes.
    pub write_stall_timeout: Option<Duration>,
    /// HTTPS on the TCP listeners (`--certfile`); unix sockets stay plain.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Counts the open connections, for `--idle-recycle`.
    pub quiet: Arc<Quiet>,
}

/// How long a client has to finish its TLS handshake; it holds a connection place meanwhile.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl ConnectionSettings {
    fn http1(&self) -> http1::Builder {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .keep_alive(self.keep_alive.is_some())
            // Covers both the wait for the next request on an idle connection and a client
            // that sends its head too slowly.
            .header_read_timeout(self.keep_alive.unwrap_or(Duration::from_secs(30)))
            .max_buf_size(self.limits.head_buffer_size());
        if self.limits.header_fields != HYPER_DEFAULT_MAX_HEADERS {
            builder.max_headers(self.limits.header_fields);
        }
        builder
    }
}

/// How the server is asked to stop.
#[derive(Debug, Clone, Copy)]
pub enum Shutdown {
    /// Stop accepting, let in-flight requests finish for at most this long.
    Graceful(Duration),
    /// Stop now.
    Quick,
}

/// Serves until `stop` resolves, then drains as it says.
pub async fn serve(
    listeners: Vec<Listener>,
    handler: Arc<RequestHandler>,
    settings: ConnectionSettings,
    stop: impl Future<Output = Shutdown>,
) -> Result<()> {
    let (draining_tx, draining) = watch::channel(false);
    // Every connection holds a sender; the drain is over when the last one is dropped.
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    let mut accepting = JoinSet::new();
    let cap = Arc::new(ConnectionCap::new(settings.max_connections));
    for listener in listeners {
        let acceptor = Acceptor {
            handler: Arc::clone(&handler),
            http: settings.http1(),
            write_stall_timeout: settings.write_stall_timeout,
            tls: settings.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            cap: Arc::clone(&cap),
            quiet: Arc::clone(&settings.quiet),
            draining: draining.clone(),
            alive: alive.clone(),
        };
        accepting.spawn(acceptor.run(listener));
    }
    drop(alive);

    let shutdown = stop.await;
    // Dropping the accept loops closes the listening sockets: no new connection is taken.
    accepting.shutdown().await;
    match shutdown {
        Shutdown::Graceful(grace) => {
            tracing::info!(
                "stopped accepting; waiting up to {}s for in-flight requests",
                grace.as_secs_f64()
            );
            let _ = draining_tx.send(true);
            if tokio::time::timeout(grace, all_closed.recv())
                .await
                .is_err()
            {
                tracing::warn!("graceful timeout reached; closing the connections still open");
            }
        }
        Shutdown::Quick => {}
    }
    Ok(())
}

/// The places for open connections in a worker (`--max-connections`).
///
/// At the cap the worker stops accepting, as gunicorn's workers do: further clients wait in the
/// kernel's listen backlog (`--backlog`), costing the worker no descriptor and no buffer, and
/// are taken in arrival order as places free up. Answering them instead (a 503) would mean
/// accepting and reading each one, which is the cost the cap is there to bound. A place frees
/// up when a connection closes: a client that finishes, an idle keep-alive connection or a head
/// slower than `--keep-alive` (hyper's header timeout), so slow clients hold places for a
/// bounded time.
struct ConnectionCap {
    places: Arc<Semaphore>,
    limit: usize,
    last_warning: Mutex<Option<Instant>>,
}

/// A connection's place, held until the connection closes.
type Place = OwnedSemaphorePermit;

/// What an accepted connection holds until it closes: its place, and its count as open.
type Held = (Place, Open);

impl ConnectionCap {
    fn new(limit: usize) -> ConnectionCap {
        ConnectionCap {
            places: Arc::new(Semaphore::new(limit)),
            limit,
            last_warning: Mutex::new(None),
        }
    }

    /// Waits for a free place.
    async fn place(&self) -> Place {
        if let Ok(place) = Arc::clone(&self.places).try_acquire_owned() {
            return place;
        }
        self.warn_full();
        Arc::clone(&self.places)
            .acquire_owned()
            .await
            // The semaphore is never closed.
            .expect("connection places closed")
    }

    fn warn_full(&self) {
        let mut last = crate::lock::lock(&self.last_warning);
        if last.is_none_or(|at| at.elapsed() >= CAP_WARNING_INTERVAL) {
            *last = Some(Instant::now());
            tracing::warn!(
                "{} connections open, the most a worker holds (--max-connections): new clients wait in the listen backlog",
                self.limit
            );
        }
    }
}

#[derive(Clone)]
struct Acceptor {
    handler: Arc<RequestHandler>,
    http: http1::Builder,
    write_stall_timeout: Option<Duration>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cap: Arc<ConnectionCap>,
    quiet: Arc<Quiet>,
    draining: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
}

impl Acceptor {
    async fn run(self, listener: Listener) {
        if let Err(error) = self.accept(listener).await {
            tracing::error!("stopped accepting: {error:#}");
        }
    }

    async fn accept(&self, listener: Listener) -> Result<()> {
        match listener {
            Listener::Tcp(listener) => {
                let local = listener.local_addr()?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                loop {
                    let place = self.cap.place().await;
                    match listener.accept().await {
                        Ok((stream, remote)) => {
                            // Nagle plus delayed ACKs would add tens of milliseconds to small responses.
                            let _ = stream.set_nodelay(true);
                            let peer = tcp_peer(remote, local, self.tls.is_some());
                            let held = (place, self.quiet.opened());
                            match &self.tls {
                                None => self.spawn(stream, peer, held),
                                Some(tls) => self.spawn_after_handshake(tls, stream, peer, held),
                            }
                        }
                        Err(error) => accept_failed(error).await,
                    }
                }
            }
            Listener::Unix { listener, .. } => {
                let listener = tokio::net::UnixListener::from_std(listener)?;
                let peer = Arc::new(Peer {
                    ip: None,
                    local_authority: "localhost".to_owned(),
                    tls: false,
                });
                loop {
                    let place = self.cap.place().await;
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            let held = (place, self.quiet.opened());
                            self.spawn(stream, Arc::clone(&peer), held)
                        }
                        Err(error) => accept_failed(error).await,
                    }
                }
            }
        }
    }

    /// Serves `stream` once its TLS handshake is done, on a task of its own so that a slow
    /// handshake holds up no other client.
    fn spawn_after_handshake(
        &self,
        tls: &tokio_rustls::TlsAcceptor,
        stream: tokio::net::TcpStream,
        peer: Arc<Peer>,
        held: Held,
    ) {
        let handshake = tls.accept(stream);
        let acceptor = self.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(stream)) => acceptor.spawn(stream, peer, held),
                // The client's failure, not the host's: a client that speaks plain HTTP or
                // offers no certificate where one is required ends here.
                Ok(Err(error)) => {
                    tracing::debug!("TLS handshake with {} failed: {error}", peer.label())
                }
                Err(_) => tracing::debug!("TLS handshake with {} timed out", peer.label()),
            }
        });
    }

    fn spawn<S>(&self, stream: S, peer: Arc<Peer>, held: Held)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        match self.write_stall_timeout {
            Some(timeout) => self.serve(
                WriteStallTimeout::new(TokioIo::new(stream), timeout),
                peer,
                held,
            ),
            None => self.serve(TokioIo::new(stream), peer, held),
        }
    }

    fn serve<I>(&self, io: I, peer: Arc<Peer>, held: Held)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let handler = Arc::clone(&self.handler);
        let service = service_fn({
            let draining = self.draining.clone();
            move |request| {
                let answer = Arc::clone(&handler).handle(request, Arc::clone(&peer));
                let draining = draining.clone();
                async move {
                    let mut response = answer.await?;
                    // A response given while the worker drains is the connection's last: hyper
                    // closes it once the response is out, so no next request can be sent into
                    // a connection about to close.
                    if *draining.borrow() {
                        response
                            .headers_mut()
                            .insert(CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(response)
                }
            }
        });
        let connection = self.http.serve_connection(io, service);
        let mut draining = self.draining.clone();
        let alive = self.alive.clone();
        tokio::spawn(async move {
            let _alive = alive;
            let _held = held;
            tokio::pin!(connection);
            let drain = async move {
                // The watch guard must not live across an await.
                let _ = draining.wait_for(|draining| *draining).await.map(drop);
            };
            tokio::select! {
                result = connection.as_mut() => return log_connection_end(result),
                () = drain => {}
            }
            // A client may be sending a request on this connection now: the first one of a
            // connection just accepted, or the next one on a kept-alive connection. Closing
            // under it would fail it (the client cannot tell whether it was served), so a
            // request gets a moment to arrive; its response says Connection: close and ends
            // the connection. A client silent for that long finds the connection closed
            // before it sends, as after a keep-alive timeout.
            tokio::select! {
                result = connection.as_mut() => return log_connection_end(result),
                () = tokio::time::sleep(REQUEST_GRACE) => {}
            }
            // A request still in flight finishes first, with Connection: close.
            connection.as_mut().graceful_shutdown();
            log_connection_end(connection.await);
        });
    }
}

fn tcp_peer(remote: SocketAddr, local: SocketAddr, tls: bool) -> Arc<Peer> {
    Arc::new(Peer {
        ip: Some(remote.ip()),
        local_authority: local.to_string(),
        tls,
    })
}

fn log_connection_end(result: Result<(), hyper::Error>) {
    if let Err(error) = result {
        tracing::debug!("connection ended: {error}");
    }
}
