//! postern: TCP and serial byte streams through firewalls that only let HTTP out.
#![forbid(unsafe_code)]

pub mod core;
