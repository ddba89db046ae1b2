//! The targets every route leads to, in this process: a sink, a source and
//! an echo server.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::measure::Test;
use crate::payload::{Payload, Received};

/// What the sink reports when a connection ends.
pub(crate) struct Arrival {
    pub(crate) received: Received,
    pub(crate) at: Instant,
}

/// The targets every route leads to: a sink that counts and hashes what it
/// is sent, a source that sends the payload of the current test, and an
/// echo server.
pub(crate) struct Targets {
    pub(crate) sink: SocketAddr,
    pub(crate) source: SocketAddr,
    pub(crate) echo: SocketAddr,
    arrivals: mpsc::Receiver<Arrival>,
    /// The payload the source sends to the next connections.
    next_download: mpsc::Sender<(u64, Vec<u8>)>,
}

impl Targets {
    pub(crate) fn start() -> Result<Targets, String> {
        let bind = || TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string());
        let (sink, source, echo) = (bind()?, bind()?, bind()?);
        let addr = |l: &TcpListener| l.local_addr().map_err(|e| e.to_string());
        let (sink_addr, source_addr, echo_addr) = (addr(&sink)?, addr(&source)?, addr(&echo)?);
        let (arrived, arrivals) = mpsc::channel();
        thread::spawn(move || {
            for socket in sink.incoming().flatten() {
                let arrived = arrived.clone();
                thread::spawn(move || {
                    let mut socket = socket;
                    let _ = socket.set_nodelay(true);
                    if let Ok(received) = Received::read_all(&mut socket) {
                        let _ = arrived.send(Arrival { received, at: Instant::now() });
                    }
                });
            }
        });
        let (next_download, payloads) = mpsc::channel::<(u64, Vec<u8>)>();
        thread::spawn(move || {
            let mut current = std::sync::Arc::new(Payload { block: Vec::new(), len: 0, hash: 0 });
            for socket in source.incoming().flatten() {
                while let Ok((len, block)) = payloads.try_recv() {
                    current = std::sync::Arc::new(Payload { block, len, hash: 0 });
                }
                let payload = current.clone();
                thread::spawn(move || {
                    let mut socket = socket;
                    let _ = socket.set_nodelay(true);
                    if payload.write_to(&mut socket).is_ok() {
                        let _ = socket.shutdown(Shutdown::Write);
                        // Until the client closes, so its read sees a clean end.
                        let mut rest = [0u8; 64];
                        while matches!(socket.read(&mut rest), Ok(n) if n > 0) {}
                    }
                });
            }
        });
        thread::spawn(move || {
            for socket in echo.incoming().flatten() {
                thread::spawn(move || {
                    let mut socket = socket;
                    let _ = socket.set_nodelay(true);
                    let mut buf = vec![0u8; 16 << 10];
                    while let Ok(n @ 1..) = socket.read(&mut buf) {
                        if socket.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Targets {
            sink: sink_addr,
            source: source_addr,
            echo: echo_addr,
            arrivals,
            next_download,
        })
    }

    /// The three targets by the names routes give them.
    pub(crate) fn all(&self) -> [(&'static str, SocketAddr); 3] {
        [("sink", self.sink), ("source", self.source), ("echo", self.echo)]
    }

    /// Sets what the source sends next and forgets stray sink arrivals.
    pub(crate) fn expect(&self, test: Test, payload: &Payload) {
        while self.arrivals.try_recv().is_ok() {}
        if matches!(test, Test::Down | Test::DownMany) {
            let _ = self.next_download.send((payload.len, payload.block.clone()));
        }
    }

    /// The sink's report on a transfer under way. Connections that carry
    /// nothing (a tunnel probing its target) are not transfers.
    pub(crate) fn arrival(&self, limit: Duration) -> Result<Arrival, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.arrivals.recv_timeout(left) {
                Ok(arrival) if arrival.received.bytes == 0 => continue,
                Ok(arrival) => return Ok(arrival),
                Err(_) => return Err(format!("nothing reached the sink within {limit:?}")),
            }
        }
    }
}
