//! A TCP relay in front of a real server, to make outages.

use super::*;

/// What a `Relay` does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// Passes bytes both ways to the target.
    Forward,
    /// Accepts and closes at once: a server that dies on every request.
    Drop,
}

/// A TCP relay on a loopback port in front of a real server, to make outages: `cut` closes
/// every connection and refuses new ones until `resume`.
pub struct Relay {
    pub addr: SocketAddr,
    target: SocketAddr,
    state: std::sync::Arc<RelayState>,
}

struct RelayState {
    mode: std::sync::Mutex<RelayMode>,
    up: std::sync::atomic::AtomicBool,
    accepted: std::sync::atomic::AtomicUsize,
    open: std::sync::Mutex<Vec<TcpStream>>,
}

impl Relay {
    pub fn start(target: SocketAddr, mode: RelayMode) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind the relay");
        let relay = Relay {
            addr: listener
                .local_addr()
                .expect("a bound socket has an address"),
            target,
            state: std::sync::Arc::new(RelayState {
                mode: std::sync::Mutex::new(mode),
                up: std::sync::atomic::AtomicBool::new(true),
                accepted: std::sync::atomic::AtomicUsize::new(0),
                open: std::sync::Mutex::new(Vec::new()),
            }),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&self, listener: TcpListener) {
        use std::sync::atomic::Ordering;
        let state = std::sync::Arc::clone(&self.state);
        let target = self.target;
        listener
            .set_nonblocking(true)
            .expect("cannot make the relay's listener non-blocking");
        std::thread::spawn(move || {
            while state.up.load(Ordering::Acquire) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => break,
                };
                state.accepted.fetch_add(1, Ordering::AcqRel);
                let _ = client.set_nonblocking(false);
                if *state.mode.lock().unwrap() == RelayMode::Drop {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                for stream in [&client, &server] {
                    if let Ok(copy) = stream.try_clone() {
                        state.open.lock().unwrap().push(copy);
                    }
                }
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
    }

    pub fn set_mode(&self, mode: RelayMode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state
            .accepted
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Closes every connection and the listener: the server is unreachable.
    pub fn cut(&self) {
        self.state
            .up
            .store(false, std::sync::atomic::Ordering::Release);
        for stream in self.state.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        // The accept loop notices within a few milliseconds and drops the listener.
        let closed = poll_until(Duration::from_secs(5), POLL_INTERVAL, || {
            TcpStream::connect_timeout(&self.addr, Duration::from_millis(100))
                .is_err()
                .then_some(())
        });
        assert!(closed.is_some(), "the relay did not close its port");
    }

    /// Listens again on the same port.
    pub fn resume(&self) {
        let listener =
            TcpListener::bind(self.addr).expect("cannot listen on the relay's port again");
        self.state
            .up
            .store(true, std::sync::atomic::Ordering::Release);
        self.serve(listener);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state
            .up
            .store(false, std::sync::atomic::Ordering::Release);
        for stream in self.state.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}
