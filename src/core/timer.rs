//! The session's timers. Each is a deadline the session computes from its
//! state; the driver sleeps until the earliest and calls `handle_timeout`.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// A received packet's ack has waited long enough for data to ride on.
    Ack,
    /// Nothing has been sent for a while; send an empty packet.
    Keepalive,
    /// Nothing has been received for too long; the session is dead.
    Idle,
}

impl Timer {
    pub const ALL: [Timer; 3] = [Timer::Ack, Timer::Keepalive, Timer::Idle];
}
