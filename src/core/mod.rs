//! The protocol core: no sockets, no executor, no clock. Time comes in as a
//! parameter, so tests drive it with simulated time over in-memory links.

pub mod connection;
pub mod frame;
pub mod ring;
pub mod rtt;
pub mod session;
pub mod streams;
pub mod timer;
pub mod window;

#[cfg(test)]
mod tests;
