//! The client side of the tests: connections through a route's entry that
//! write or read a payload, or exchange messages with the echo target; each
//! checks what arrived.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::measure::Latency;
use crate::payload::{Payload, Received};
use crate::targets::Targets;

/// Bytes of one latency message: a small telemetry record or request.
pub(crate) const MESSAGE: usize = 64;

/// Round trips made before the timed ones of each latency measurement.
pub(crate) const LATENCY_WARM_UP: usize = 20;

pub(crate) fn connect(entry: SocketAddr, limit: Duration) -> Result<TcpStream, String> {
    let socket = TcpStream::connect(entry).map_err(|e| format!("connect {entry}: {e}"))?;
    let _ = socket.set_nodelay(true);
    socket.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    socket.set_write_timeout(Some(limit)).map_err(|e| e.to_string())?;
    Ok(socket)
}

/// Writes the payload into `entry`; done when the sink has seen all of it
/// and the end of the stream.
pub(crate) fn send_up(
    entry: SocketAddr,
    payload: &Payload,
    targets: &Targets,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut socket = connect(entry, limit)?;
    payload.write_to(&mut socket).map_err(|e| format!("write: {e}"))?;
    socket.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
    let arrival = targets.arrival(limit)?;
    check(arrival.received, payload)?;
    Ok(arrival.at - started)
}

/// Reads everything the source sends through `entry`.
pub(crate) fn receive_down(
    entry: SocketAddr,
    payload: &Payload,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut socket = connect(entry, limit)?;
    let received = Received::read_all(&mut socket).map_err(|e| format!("read: {e}"))?;
    let elapsed = started.elapsed();
    check(received, payload)?;
    Ok(elapsed)
}

/// `streams` connections at once, each writing the payload; done when the
/// sink has seen all of them end.
pub(crate) fn send_up_many(
    entry: SocketAddr,
    streams: usize,
    payload: &Payload,
    targets: &Targets,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    // The sockets stay open until every arrival is in: some tunnels take a
    // close as an abort.
    let sockets = thread::scope(|scope| {
        let writers: Vec<_> = (0..streams)
            .map(|_| {
                scope.spawn(|| {
                    let mut socket = connect(entry, limit)?;
                    payload.write_to(&mut socket).map_err(|e| format!("write: {e}"))?;
                    socket.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
                    Ok::<_, String>(socket)
                })
            })
            .collect();
        writers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err("writer panicked".to_owned())))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let mut last = started;
    for _ in 0..streams {
        let arrival = targets.arrival(limit)?;
        check(arrival.received, payload)?;
        last = last.max(arrival.at);
    }
    drop(sockets);
    Ok(last - started)
}

/// `streams` connections at once, each reading what the source sends.
pub(crate) fn receive_down_many(
    entry: SocketAddr,
    streams: usize,
    payload: &Payload,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    thread::scope(|scope| {
        let readers: Vec<_> = (0..streams)
            .map(|_| {
                scope.spawn(|| {
                    let mut socket = connect(entry, limit)?;
                    let received =
                        Received::read_all(&mut socket).map_err(|e| format!("read: {e}"))?;
                    let done = Instant::now();
                    check(received, payload)?;
                    Ok::<_, String>(done)
                })
            })
            .collect();
        let mut last = started;
        for reader in readers {
            let done = reader.join().unwrap_or_else(|_| Err("reader panicked".to_owned()))?;
            last = last.max(done);
        }
        Ok(last - started)
    })
}

/// `messages` round trips of a [`MESSAGE`]-byte message through `entry` to
/// the echo target, one at a time on one connection, after a few untimed
/// ones; each reply is checked.
pub(crate) fn round_trips(
    entry: SocketAddr,
    messages: usize,
    limit: Duration,
) -> Result<Latency, String> {
    let mut socket = connect(entry, limit)?;
    let mut message = [0u8; MESSAGE];
    let mut reply = [0u8; MESSAGE];
    let mut times = Vec::with_capacity(messages);
    for i in 0..LATENCY_WARM_UP + messages {
        for (j, byte) in message.iter_mut().enumerate() {
            *byte = (i * 31 + j) as u8;
        }
        let sent = Instant::now();
        socket.write_all(&message).map_err(|e| format!("write: {e}"))?;
        socket.read_exact(&mut reply).map_err(|e| format!("read: {e}"))?;
        let time = sent.elapsed();
        if reply != message {
            return Err(format!("message {i} came back changed"));
        }
        if i >= LATENCY_WARM_UP {
            times.push(time);
        }
    }
    times.sort();
    let at = |fraction: f64| times[((times.len() as f64 * fraction) as usize).min(times.len() - 1)];
    Ok(Latency { p50: at(0.50), p99: at(0.99) })
}

fn check(received: Received, payload: &Payload) -> Result<(), String> {
    if received.bytes != payload.len || received.hash != payload.hash {
        return Err(format!(
            "received {} of {} bytes{}",
            received.bytes,
            payload.len,
            if received.hash != payload.hash { ", hash differs" } else { "" }
        ));
    }
    Ok(())
}
