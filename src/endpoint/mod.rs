//! Endpoints: the local ends of streams that are not TCP sockets.
//!
//! A stream's local end is anything [`crate::tunnel::Tunnel::pump`] can
//! carry: an async byte stream that reads, writes and half-closes. TCP
//! sockets are that already; this module adds serial lines. It does not
//! decide when a line is opened or reopened: the agent does.

pub mod serial;
