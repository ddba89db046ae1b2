//! The agent's `[[forward]]` entries as they run: each in its own task
//! group, so that a reload adds, removes or re-targets one without
//! touching the streams of the others.
//!
//! ```text
//!  config forwards ─▶ bind the new listeners (all or none) ─▶ stop removed ─▶ start added
//!                                                            └▶ kept: a new target applies to new connections
//! ```
//!
//! A forward is known by its source as configured: its listen address, or
//! its serial line with all its settings (a new baud rate reopens the line).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use smol::net::TcpListener;

use super::{accept_forward, lock, serial, Error, Shared};
use crate::config::{Forward, ForwardSource};
use crate::task::Scope;

/// A forward whose listener is bound (or serial line prepared), not yet running.
pub(super) struct Ready {
    source: ForwardSource,
    target: String,
    bound: Bound,
}

enum Bound {
    Listen(TcpListener),
    Serial(Arc<serial::Line>),
}

impl Ready {
    /// The bound address, for a TCP forward.
    pub(super) fn local_addr(&self) -> Option<SocketAddr> {
        match &self.bound {
            Bound::Listen(listener) => listener.local_addr().ok(),
            Bound::Serial(_) => None,
        }
    }
}

/// Binds the listeners of `forwards`; the first that cannot be bound fails
/// them all, and the ones bound so far are closed.
pub(super) async fn prepare(forwards: Vec<Forward>) -> Result<Vec<Ready>, Error> {
    let mut ready = Vec::with_capacity(forwards.len());
    for forward in forwards {
        let bound =
            match &forward.source {
                ForwardSource::Listen(addr) => {
                    let listener = TcpListener::bind(*addr).await.map_err(|source| {
                        Error::Bind { addr: *addr, target: forward.target.clone(), source }
                    })?;
                    Bound::Listen(listener)
                }
                ForwardSource::Serial(config) => {
                    let peer = format!("target {:?}", forward.target);
                    Bound::Serial(serial::Line::new(config.clone(), peer))
                }
            };
        ready.push(Ready { source: forward.source, target: forward.target, bound });
    }
    Ok(ready)
}

/// One running forward.
struct Entry {
    source: ForwardSource,
    /// Read at each accepted connection: a reload changes it in place.
    target: Arc<Mutex<String>>,
    /// Where it listens or which line it reads, for log lines.
    name: String,
    /// Its accept loop or line tasks, and through them its connections.
    _tasks: Scope,
}

/// The running forwards, in the order they were started.
#[derive(Default)]
pub(super) struct Running(Vec<Entry>);

impl Running {
    /// Starts `ready` and logs where it forwards.
    pub(super) fn start(&mut self, shared: &Arc<Shared>, ready: Ready) {
        let tasks = Scope::new();
        let target = Arc::new(Mutex::new(ready.target.clone()));
        let name = match ready.bound {
            Bound::Listen(listener) => {
                let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                log::info!("forwarding {addr} to station target {:?}", ready.target);
                tasks.spawn(accept_forward(shared.clone(), listener, target.clone()));
                addr
            }
            Bound::Serial(line) => {
                log::info!(
                    "forwarding serial {} to station target {:?}",
                    line.path(),
                    ready.target
                );
                tasks.spawn(serial::keep_line(line.clone()));
                tasks.spawn(serial::carry_line(shared.clone(), line.clone(), ready.target.clone()));
                format!("serial {}", line.path())
            }
        };
        self.0.push(Entry { source: ready.source, target, name, _tasks: tasks });
    }

    /// Which of `wanted` are not running yet (to bind before anything
    /// changes), and which running entries `wanted` keeps, by index.
    pub(super) fn plan(&self, wanted: &[Forward]) -> (Vec<Forward>, Vec<Option<usize>>) {
        let mut kept: Vec<Option<usize>> = vec![None; self.0.len()];
        let mut found: Vec<Option<usize>> = vec![None; wanted.len()];
        // Two passes: an entry with the same source and target first, so
        // that two forwards on port 0 of one address keep their targets.
        for same_target in [true, false] {
            for (index, forward) in wanted.iter().enumerate() {
                if found[index].is_some() {
                    continue;
                }
                // A serial line with a new target restarts: its stream is
                // tied to the target it opened.
                let needs_target =
                    same_target || !matches!(forward.source, ForwardSource::Listen(_));
                let matching = self.0.iter().enumerate().find(|(i, entry)| {
                    kept[*i].is_none()
                        && entry.source == forward.source
                        && (!needs_target || *lock(&entry.target) == forward.target)
                });
                if let Some((i, _)) = matching {
                    kept[i] = Some(index);
                    found[index] = Some(i);
                }
            }
        }
        let new = wanted
            .iter()
            .zip(&found)
            .filter(|(_, found)| found.is_none())
            .map(|(forward, _)| forward.clone())
            .collect();
        (new, kept)
    }

    /// Applies a [`Running::plan`]: stops the entries `kept` does not
    /// keep, points kept ones at their new targets, starts `ready`.
    /// Returns what changed, one line each.
    pub(super) fn apply(
        &mut self,
        shared: &Arc<Shared>,
        wanted: &[Forward],
        kept: &[Option<usize>],
        ready: Vec<Ready>,
    ) -> Vec<String> {
        let mut changes = Vec::new();
        let entries = std::mem::take(&mut self.0);
        for (entry, keep) in entries.into_iter().zip(kept) {
            let Some(index) = keep else {
                changes.push(format!(
                    "forward {} to {:?} removed; its connections are closed",
                    entry.name,
                    lock(&entry.target)
                ));
                continue;
            };
            let target = &wanted[*index].target;
            let mut current = lock(&entry.target);
            if *current != *target {
                changes.push(format!(
                    "forward {} now goes to {target:?} (was {:?}); open connections stay with the old target",
                    entry.name, *current
                ));
                current.clone_from(target);
            }
            drop(current);
            self.0.push(entry);
        }
        for ready in ready {
            let target = ready.target.clone();
            self.start(shared, ready);
            let name = &self.0.last().expect("just started").name;
            changes.push(format!("forward {name} to {target:?} added"));
        }
        changes
    }

    /// Stops every forward and its connections.
    pub(super) fn stop_all(&mut self) {
        self.0.clear();
    }
}
