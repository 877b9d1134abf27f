//! `wasi:io` input streams made inside the host, so that bulk bytes flow from one capability to
//! the next (request body → encryption → MAC → storage) without entering guest memory.
//!
//! A stream here is pulled: nothing is read from its source until its reader asks (or, for a
//! stage run `Ahead`, until a few chunks wait for the reader), so memory stays at a few chunks
//! per stage whatever the size of the stream, and a slow reader slows the source.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use wasmtime_wasi::p2::{DynInputStream, InputStream, Pollable, StreamError, StreamResult};

/// The largest chunk a stage reads from its source at once.
pub const CHUNK: usize = 256 * 1024;

/// What a failed stage says; the reader sees it as the stream's last-operation-failed error.
pub type Failure = anyhow::Error;

/// The next bytes of a produced stream: `Ok(None)` at its end.
pub type Next = Result<Option<Bytes>, Failure>;

/// A stage that makes bytes on demand. `next` gets the producer by value and gives it back, so
/// a read in progress survives its reader giving up on it (a poll that returns early).
pub trait Produce: Send + Sized + 'static {
    fn next(self) -> impl Future<Output = (Self, Next)> + Send;
}

type Pending<P> = Pin<Box<dyn Future<Output = (P, Next)> + Send>>;

enum State<P> {
    Idle(P),
    Producing(Pending<P>),
    /// The producer's end or failure, reported once the buffered bytes are read.
    Finished(Option<Failure>),
    /// Transient, while a state is being replaced.
    Empty,
}

/// An input stream over a producer.
pub struct Produced<P: Produce> {
    state: State<P>,
    buffered: Bytes,
}

impl<P: Produce> Produced<P> {
    pub fn new(producer: P) -> Produced<P> {
        Produced {
            state: State::Idle(producer),
            buffered: Bytes::new(),
        }
    }

    pub fn boxed(producer: P) -> DynInputStream {
        Box::new(Produced::new(producer))
    }
}

#[wasmtime_wasi::async_trait]
impl<P: Produce> Pollable for Produced<P> {
    async fn ready(&mut self) {
        if !self.buffered.is_empty() {
            return;
        }
        if let State::Idle(_) = self.state {
            let State::Idle(producer) = std::mem::replace(&mut self.state, State::Empty) else {
                unreachable!("matched just above")
            };
            self.state = State::Producing(Box::pin(producer.next()));
        }
        if let State::Producing(pending) = &mut self.state {
            let (producer, next) = pending.await;
            self.state = match next {
                Ok(Some(bytes)) => {
                    self.buffered = bytes;
                    State::Idle(producer)
                }
                Ok(None) => State::Finished(None),
                Err(failure) => State::Finished(Some(failure)),
            };
        }
    }
}

#[wasmtime_wasi::async_trait]
impl<P: Produce> InputStream for Produced<P> {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        if !self.buffered.is_empty() {
            let take = size.min(self.buffered.len());
            return Ok(self.buffered.split_to(take));
        }
        match &mut self.state {
            State::Finished(failure) => match failure.take() {
                Some(failure) => {
                    self.state = State::Finished(None);
                    Err(StreamError::LastOperationFailed(
                        wasmtime::Error::from_anyhow(failure),
                    ))
                }
                None => Err(StreamError::Closed),
            },
            // Not ready yet: the reader awaits `ready` and asks again.
            _ => Ok(Bytes::new()),
        }
    }
}

/// How many streams made by the capabilities one instance holds, shared with each such stream
/// so that dropping it (wherever it went: the table, another stage) counts it out.
#[derive(Clone, Default)]
pub struct StreamCount(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl StreamCount {
    /// `stream`, counted, if fewer than `limit` are held; else `None`.
    pub fn count(&self, stream: DynInputStream, limit: usize) -> Option<DynInputStream> {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < limit).then_some(held + 1)
            })
            .ok()?;
        Some(Box::new(Counted {
            stream,
            count: self.clone(),
        }))
    }
}

/// A stream counted in its instance's `StreamCount` until it is dropped.
struct Counted {
    stream: DynInputStream,
    count: StreamCount,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.count
            .0
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Counted {
    async fn ready(&mut self) {
        self.stream.ready().await
    }
}

#[wasmtime_wasi::async_trait]
impl InputStream for Counted {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        self.stream.read(size)
    }

    fn skip(&mut self, size: usize) -> StreamResult<usize> {
        self.stream.skip(size)
    }

    async fn cancel(&mut self) {
        self.stream.cancel().await
    }
}

/// Reads the next chunk of `source`: `Ok(None)` at its end.
pub async fn read_chunk(source: &mut DynInputStream, size: usize) -> Next {
    loop {
        source.ready().await;
        match source.read(size) {
            // A source may wake its reader before it has bytes.
            Ok(bytes) if bytes.is_empty() => tokio::task::yield_now().await,
            Ok(bytes) => return Ok(Some(bytes)),
            Err(StreamError::Closed) => return Ok(None),
            Err(StreamError::LastOperationFailed(error)) | Err(StreamError::Trap(error)) => {
                return Err(anyhow::Error::from(error));
            }
        }
    }
}

/// A stage that changes each chunk of its source on its way through.
pub struct Map<F> {
    source: DynInputStream,
    change: F,
}

/// What a `Map` does to a chunk; `end` is told once the source has ended.
pub trait Change: Send + 'static {
    fn chunk(&mut self, bytes: Bytes) -> impl Future<Output = Next> + Send;
    fn end(&mut self) {}
}

impl<F: Change> Map<F> {
    pub fn new(source: DynInputStream, change: F) -> Map<F> {
        Map { source, change }
    }
}

impl<F: Change> Produce for Map<F> {
    async fn next(mut self) -> (Self, Next) {
        let next = match read_chunk(&mut self.source, CHUNK).await {
            Ok(Some(bytes)) => self.change.chunk(bytes).await,
            Ok(None) => {
                self.change.end();
                Ok(None)
            }
            Err(failure) => Err(failure),
        };
        (self, next)
    }
}

/// A stream of bytes the host already holds.
pub fn from_bytes(bytes: Bytes) -> DynInputStream {
    Produced::boxed(Held(bytes))
}

struct Held(Bytes);

impl Produce for Held {
    async fn next(mut self) -> (Self, Next) {
        if self.0.is_empty() {
            return (self, Ok(None));
        }
        let chunk = self.0.split_to(self.0.len().min(CHUNK));
        (self, Ok(Some(chunk)))
    }
}

/// Runs a stage ahead of its reader on the bulk threads, up to `AHEAD` chunks: while the
/// reader works on a chunk (a MAC, a write), the next ones are being made (read, encrypted), so
/// the stages use every core and a slow hand-over between threads is hidden.
pub struct Ahead<P: Produce> {
    state: AheadState<P>,
}

const AHEAD: usize = 4;

enum AheadState<P> {
    Idle(P),
    Running {
        chunks: tokio::sync::mpsc::Receiver<Next>,
        task: tokio::task::JoinHandle<()>,
    },
    Done,
}

impl<P: Produce> Ahead<P> {
    pub fn new(producer: P) -> Ahead<P> {
        Ahead {
            state: AheadState::Idle(producer),
        }
    }
}

impl<P: Produce> Produce for Ahead<P> {
    async fn next(mut self) -> (Self, Next) {
        if let AheadState::Idle(_) = self.state {
            let AheadState::Idle(mut producer) =
                std::mem::replace(&mut self.state, AheadState::Done)
            else {
                unreachable!("matched just above")
            };
            let (sender, chunks) = tokio::sync::mpsc::channel(AHEAD);
            let task = bulk_threads().spawn(async move {
                loop {
                    let (next_producer, next) = producer.next().await;
                    producer = next_producer;
                    let more = matches!(next, Ok(Some(_)));
                    if sender.send(next).await.is_err() || !more {
                        break;
                    }
                }
            });
            self.state = AheadState::Running { chunks, task };
        }
        let next = match &mut self.state {
            AheadState::Running { chunks, .. } => match chunks.recv().await {
                Some(next) => next,
                None => Err(anyhow::anyhow!("a stream stage ended without a word")),
            },
            _ => Ok(None),
        };
        if !matches!(next, Ok(Some(_))) {
            self.state = AheadState::Done;
        }
        (self, next)
    }
}

impl<P: Produce> Drop for Ahead<P> {
    fn drop(&mut self) {
        if let AheadState::Running { task, .. } = &self.state {
            task.abort();
        }
    }
}

/// The threads that run stream stages ahead of their readers. A task spawned from an async
/// thread onto its own runtime waits in that thread's next-task slot until the spawner yields;
/// spawned onto another runtime, it is taken at once by whichever thread is idle.
fn bulk_threads() -> &'static tokio::runtime::Handle {
    static BULK: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    BULK.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(2 * threads + 4)
            .thread_name("bulk")
            .enable_all()
            .build()
            .expect("the bulk threads start with the worker")
    })
    .handle()
}

/// The streams made by the capabilities (object reads, encryption, MAC taps, verified reads) an
/// instance may hold at once, wherever they are (in its table or inside another such stream).
/// Each holds chunks in the host: up to 6 of 256 KiB for a stage that runs ahead of its reader
/// (encryption, a tap), 1 for the others, and an open file for a local object read. Lenzeye
/// holds 3 at most (a download: read, verification, decryption).
pub const MAX_CAPABILITY_STREAMS: usize = 8;

/// Raised when an instance asks for a capability stream beyond `MAX_CAPABILITY_STREAMS`.
#[derive(Debug)]
pub struct TooManyStreams;

impl std::fmt::Display for TooManyStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the instance already holds {MAX_CAPABILITY_STREAMS} capability streams"
        )
    }
}

impl std::error::Error for TooManyStreams {}
