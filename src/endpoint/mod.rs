//! Endpoints: the local ends of streams, and the pumps that carry bytes
//! between them and their streams.
//!
//! Each kind of local end has its pump, chosen by its type where the
//! stream is opened: a TCP socket moves bytes in place ([`tcp`]); any other
//! async byte stream that reads, writes and half-closes goes through a
//! staging buffer ([`staged`]), which is how serial lines ([`serial`]) are
//! carried. This module does not decide when a line is opened or
//! reopened: the agent does.

pub mod serial;
pub mod staged;
pub mod tcp;

/// Bytes one socket read moves into a stream at most: the whole send
/// buffer, so a fast local writer costs few system calls.
const SOCKET_READ: usize = crate::core::streams::SEND_BUFFER;

/// Why a pump gave up on its local end; the stream is reset with it as
/// the reason, which the peer logs.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("local read failed: {0}")]
    Read(std::io::Error),
    #[error("local write failed: {0}")]
    Write(std::io::Error),
}
