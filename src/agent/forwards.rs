//! The agent's `[[forward]]` entries as they run: each in its own task
//! group, so that a reload adds, removes, moves or re-targets one without
//! touching the streams of the others.
//!
//! ```text
//!  config forwards ─▶ plan ─▶ bind the new listeners ─▶ stop removed ─▶ start added (moved: with their connections)
//!                      │       └▶ port held by a leaving forward: close its listener, bind again
//!                      │            └▶ fails still: it listens again, the reload is refused
//!                      └▶ kept: a new target applies to new connections
//! ```
//!
//! A forward is known by its source as configured: its listen address, or
//! its serial line with all its settings (a new baud rate reopens the line).
//! A listen address gone from the config, with its target still served on
//! a new address, is a *move*: the new listener takes over the forward's
//! open connections, which belong to the forward, not to its accept loop.
//! Any other forward gone is removed, and its connections close.
//!
//! A new address often needs a port a leaving forward holds: `0.0.0.0:P`
//! to `127.0.0.1:P`, or a removed forward's port given to an added one.
//! Such a bind fails while the old listener is open, so the new listeners
//! are bound in two rounds: all of them, then, if some failed with the
//! port in use and a leaving forward (moved or removed) listens on that
//! port, the failed ones again once the *listeners* of those forwards are
//! closed. Only their listeners: their connections carry on until the
//! reload applies, so a refused reload loses none. If the second round
//! fails too, the closed listeners listen again on the addresses they had
//! and the reload is refused with the error: the running config stays.
//! While closed (a few system calls), their port refuses connections.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use smol::net::TcpListener;

use super::{accept_forward, lock, serial, Connections, Error, Shared};
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

/// Listens on `addr` at once (std's bind, which async-io's is too), so
/// that a refused reload can listen again while it holds the forwards.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::try_from(std::net::TcpListener::bind(addr)?)
}

/// Binds the listener of `forward`, or prepares its serial line.
fn prepare_one(forward: Forward) -> Result<Ready, Error> {
    let bound = match &forward.source {
        ForwardSource::Listen(addr) => Bound::Listen(listen(*addr).map_err(|source| {
            Error::Bind { addr: *addr, target: forward.target.clone(), source }
        })?),
        ForwardSource::Serial(config) => {
            let peer = format!("target {:?}", forward.target);
            Bound::Serial(serial::Line::new(config.clone(), peer))
        }
    };
    Ok(Ready { source: forward.source, target: forward.target, bound })
}

/// Binds the listeners of `forwards`; the first that cannot be bound fails
/// them all, and the ones bound so far are closed.
pub(super) fn prepare(forwards: Vec<Forward>) -> Result<Vec<Ready>, Error> {
    forwards.into_iter().map(prepare_one).collect()
}

/// The port a bind failed on because another socket holds it.
fn port_in_use(error: &Error) -> Option<u16> {
    match error {
        Error::Bind { addr, source, .. } if source.kind() == io::ErrorKind::AddrInUse => {
            Some(addr.port())
        }
        _ => None,
    }
}

/// Binds the forwards `plan` adds, in the two rounds the module doc
/// describes: a port a leaving forward holds is bound once that forward's
/// listener is closed. On failure every leaving listener closed listens
/// again and nothing else has changed.
pub(super) async fn prepare_reload(shared: &Arc<Shared>, plan: &Plan) -> Result<Vec<Ready>, Error> {
    let mut tried: Vec<_> = plan.new.iter().cloned().map(prepare_one).collect();
    let ports: Vec<u16> = tried.iter().filter_map(|r| port_in_use(r.as_ref().err()?)).collect();
    let closed = lock(&shared.forwards).close_leaving(&plan.fates, &ports);
    if closed.is_empty() {
        return tried.into_iter().collect();
    }
    // The accept loops own the listeners: the ports are free once they end.
    for accept in closed {
        accept.cancel().await;
    }
    for (result, forward) in tried.iter_mut().zip(&plan.new) {
        if result.is_err() {
            *result = prepare_one(forward.clone());
        }
    }
    // Collecting closes the new listeners on failure, before the old ones
    // listen again on what may be the same address.
    let ready: Result<Vec<_>, _> = tried.into_iter().collect();
    if ready.is_err() {
        lock(&shared.forwards).listen_again(shared);
    }
    ready
}

/// Runs the accept loop of a TCP forward, which owns `listener`: the port
/// is free once the task's `cancel()` returns (a moment after its drop).
/// On the program's executor, as every task: `smol::spawn` would start
/// smol's global one, and its child-process reaper, beside it.
fn accepting(
    shared: &Arc<Shared>,
    listener: TcpListener,
    target: &Arc<Mutex<String>>,
    connections: &Arc<Connections>,
) -> smol::Task<()> {
    crate::task::spawn(accept_forward(
        shared.clone(),
        listener,
        target.clone(),
        connections.clone(),
    ))
}

/// One running forward.
struct Entry {
    source: ForwardSource,
    /// Read at each accepted connection: a reload changes it in place.
    target: Arc<Mutex<String>>,
    /// Where it listens or which line it reads, for log lines.
    name: String,
    work: Work,
}

/// The tasks of one running forward.
enum Work {
    Listen {
        /// As bound: a port 0 in the config has become the port chosen.
        addr: SocketAddr,
        /// The accept loop, which owns the listener; `None` while a
        /// reload has the listener closed.
        accept: Option<smol::Task<()>>,
        /// The connections it accepted; a move hands them on.
        connections: Arc<Connections>,
    },
    /// The line's tasks, and through them its conversations: held to
    /// stop them when dropped.
    Serial { _tasks: Scope },
}

/// What a reload does with one running forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    /// Runs on as the wanted forward at this index, whose target may be new.
    Keep(usize),
    /// Stops listening; the added forward at this index of [`Plan::new`],
    /// with the same target, takes its connections.
    Move(usize),
    /// Stops, and its connections close.
    Remove,
}

/// What a reload changes: see [`Running::plan`].
pub(super) struct Plan {
    /// The forwards not running yet, to bind before anything changes.
    new: Vec<Forward>,
    /// One per running forward, in order.
    fates: Vec<Fate>,
}

/// The running forwards, in the order they were started.
#[derive(Default)]
pub(super) struct Running(Vec<Entry>);

impl Running {
    /// Starts `ready` and logs where it forwards. A TCP forward carries on
    /// the `connections` of the forward it moves, if it is a move.
    pub(super) fn start(
        &mut self,
        shared: &Arc<Shared>,
        ready: Ready,
        connections: Option<Arc<Connections>>,
    ) {
        let target = Arc::new(Mutex::new(ready.target.clone()));
        let (name, work) = match ready.bound {
            Bound::Listen(listener) => {
                let addr = listener.local_addr().expect("a bound listener has an address");
                log::info!("forwarding {addr} to station target {:?}", ready.target);
                let connections = connections.unwrap_or_default();
                let accept = Some(accepting(shared, listener, &target, &connections));
                let work = Work::Listen { addr, accept, connections };
                (addr.to_string(), work)
            }
            Bound::Serial(line) => {
                log::info!(
                    "forwarding serial {} to station target {:?}",
                    line.path(),
                    ready.target
                );
                let tasks = Scope::new();
                tasks.spawn(serial::keep_line(line.clone()));
                tasks.spawn(serial::carry_line(shared.clone(), line.clone(), ready.target.clone()));
                (format!("serial {}", line.path()), Work::Serial { _tasks: tasks })
            }
        };
        self.0.push(Entry { source: ready.source, target, name, work });
    }

    /// Which of `wanted` are not running yet, and what becomes of each
    /// running forward: kept (by source), moved (a TCP forward whose target
    /// a new address serves), or removed.
    pub(super) fn plan(&self, wanted: &[Forward]) -> Plan {
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
        let new: Vec<Forward> = wanted
            .iter()
            .zip(&found)
            .filter(|(_, found)| found.is_none())
            .map(|(forward, _)| forward.clone())
            .collect();
        let mut fates: Vec<Fate> =
            kept.iter().map(|k| k.map_or(Fate::Remove, Fate::Keep)).collect();
        for (index, forward) in new.iter().enumerate() {
            let moving = self.0.iter().zip(&mut fates).find(|(entry, fate)| {
                **fate == Fate::Remove
                    && matches!(entry.work, Work::Listen { .. })
                    && matches!(forward.source, ForwardSource::Listen(_))
                    && *lock(&entry.target) == forward.target
            });
            if let Some((_, fate)) = moving {
                *fate = Fate::Move(index);
            }
        }
        Plan { new, fates }
    }

    /// Closes the listeners on `ports` of the forwards `fates` does not
    /// keep, and returns their accept loops to await.
    fn close_leaving(&mut self, fates: &[Fate], ports: &[u16]) -> Vec<smol::Task<()>> {
        let leaving =
            self.0.iter_mut().zip(fates).filter(|(_, fate)| !matches!(fate, Fate::Keep(_)));
        let mut closed = Vec::new();
        for (entry, _) in leaving {
            if let Work::Listen { addr, accept, .. } = &mut entry.work {
                if ports.contains(&addr.port()) {
                    log::info!(
                        "forward {} closes its listener: the reload binds its port anew",
                        entry.name
                    );
                    closed.extend(accept.take());
                }
            }
        }
        closed
    }

    /// Listens again where [`Running::close_leaving`] closed a listener.
    fn listen_again(&mut self, shared: &Arc<Shared>) {
        for entry in &mut self.0 {
            let Work::Listen { addr, accept: accept @ None, connections } = &mut entry.work else {
                continue;
            };
            match listen(*addr) {
                Ok(listener) => {
                    log::info!("forward {} listens again: the reload is refused", entry.name);
                    *accept = Some(accepting(shared, listener, &entry.target, connections));
                }
                Err(e) => log::error!(
                    "forward {} to {:?}: cannot listen there again: {e}; its open \
                     connections carry on, new ones are refused until the agent restarts",
                    entry.name,
                    lock(&entry.target)
                ),
            }
        }
    }

    /// Applies a [`Running::plan`] once its new forwards are `ready`:
    /// stops the entries it removes, points kept ones at their new targets,
    /// starts `ready` with the connections of the forwards they move.
    /// Returns what changed, one line each.
    pub(super) fn apply(
        &mut self,
        shared: &Arc<Shared>,
        wanted: &[Forward],
        plan: Plan,
        ready: Vec<Ready>,
    ) -> Vec<String> {
        let mut changes = Vec::new();
        let mut moved: Vec<Option<(String, Arc<Connections>)>> = vec![None; ready.len()];
        for (entry, fate) in std::mem::take(&mut self.0).into_iter().zip(plan.fates) {
            match (fate, entry.work) {
                (Fate::Keep(index), work) => {
                    let target = &wanted[index].target;
                    let mut current = lock(&entry.target);
                    if *current != *target {
                        changes.push(format!(
                            "forward {} now goes to {target:?} (was {:?}); open connections stay with the old target",
                            entry.name, *current
                        ));
                        current.clone_from(target);
                    }
                    drop(current);
                    self.0.push(Entry { work, ..entry });
                }
                (Fate::Move(index), Work::Listen { connections, .. }) => {
                    moved[index] = Some((entry.name, connections));
                }
                _ => changes.push(format!(
                    "forward {} to {:?} removed; its connections are closed",
                    entry.name,
                    lock(&entry.target)
                )),
            }
        }
        for (ready, moved) in ready.into_iter().zip(moved) {
            let target = ready.target.clone();
            let (from, connections) = moved.unzip();
            self.start(shared, ready, connections);
            let name = &self.0.last().expect("just started").name;
            changes.push(match from {
                Some(from) => format!(
                    "forward {from} to {target:?} moved to {name}; its open connections stay"
                ),
                None => format!("forward {name} to {target:?} added"),
            });
        }
        changes
    }

    /// Stops every forward and its connections.
    pub(super) fn stop_all(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{Agent, Handle};
    use crate::config::AgentConfig;
    use crate::keys::PrivateKey;

    fn listen_on(addr: &str, target: &str) -> Forward {
        let addr = addr.parse().expect("a socket address");
        Forward { source: ForwardSource::Listen(addr), target: target.to_owned() }
    }

    /// Running forwards without tasks, for [`Running::plan`].
    fn running(forwards: &[Forward]) -> Running {
        let entry = |forward: &Forward| {
            let ForwardSource::Listen(addr) = forward.source else { unreachable!("TCP only") };
            Entry {
                source: forward.source.clone(),
                target: Arc::new(Mutex::new(forward.target.clone())),
                name: addr.to_string(),
                work: Work::Listen { addr, accept: None, connections: Arc::default() },
            }
        };
        Running(forwards.iter().map(entry).collect())
    }

    #[test]
    fn a_new_address_for_a_target_is_a_move_and_a_new_target_a_removal() {
        let now = running(&[
            listen_on("0.0.0.0:5020", "a"),
            listen_on("127.0.0.1:5021", "b"),
            listen_on("127.0.0.1:5022", "c"),
            listen_on("127.0.0.1:5023", "d"),
        ]);
        let wanted = [
            listen_on("127.0.0.1:5022", "x"),
            listen_on("127.0.0.1:5020", "a"),
            listen_on("127.0.0.1:5021", "e"),
        ];
        let plan = now.plan(&wanted);
        // 5021 keeps its source with a new target; d leaves with no new
        // address for its target.
        assert_eq!(plan.fates, [Fate::Move(0), Fate::Keep(2), Fate::Keep(0), Fate::Remove]);
        assert_eq!(plan.new, [listen_on("127.0.0.1:5020", "a")]);
    }

    /// An agent with `forwards` running, with no station behind it.
    fn agent(forwards: &[Forward]) -> (Handle, String) {
        let station = PrivateKey::generate().public_key().to_base64();
        let head = format!(
            "station = \"http://127.0.0.1:9/\"\nstation_public_key = \"{station}\"\nprivate_key = \"{}\"\n",
            PrivateKey::generate().to_base64()
        );
        let agent = smol::block_on(Agent::bind(config(&head, forwards))).expect("bind the agent");
        let shared = agent.shared.clone();
        for ready in agent.forwards {
            lock(&shared.forwards).start(&shared, ready, None);
        }
        (Handle(shared), head)
    }

    fn config(head: &str, forwards: &[Forward]) -> AgentConfig {
        let mut text = head.to_owned();
        for forward in forwards {
            let ForwardSource::Listen(addr) = forward.source else { unreachable!("TCP only") };
            text += &format!("[[forward]]\nlisten = \"{addr}\"\ntarget = {:?}\n", forward.target);
        }
        AgentConfig::parse(&text, "agent.toml").expect("a valid config")
    }

    /// Where each running forward listens, and for which target.
    fn listening(handle: &Handle) -> Vec<(Option<SocketAddr>, String)> {
        let running = lock(&handle.0.forwards);
        let addr = |entry: &Entry| match &entry.work {
            Work::Listen { addr, accept, .. } => accept.as_ref().map(|_| *addr),
            Work::Serial { .. } => None,
        };
        running.0.iter().map(|entry| (addr(entry), lock(&entry.target).clone())).collect()
    }

    #[test]
    fn two_forwards_swap_their_ports() {
        let (handle, head) = agent(&[listen_on("0.0.0.0:0", "a"), listen_on("127.0.0.1:0", "b")]);
        let [(Some(a), _), (Some(b), _)] = listening(&handle)[..] else { panic!("two listeners") };
        let a_there = SocketAddr::from(([127, 0, 0, 1], b.port()));
        let b_there = SocketAddr::from(([0, 0, 0, 0], a.port()));
        let wanted = [listen_on(&a_there.to_string(), "a"), listen_on(&b_there.to_string(), "b")];
        let changes = smol::block_on(handle.reload(config(&head, &wanted))).expect("reloaded");
        assert_eq!(
            changes,
            [
                format!("forward {a} to \"a\" moved to {a_there}; its open connections stay"),
                format!("forward {b} to \"b\" moved to {b_there}; its open connections stay"),
            ]
        );
        assert_eq!(
            listening(&handle),
            [(Some(a_there), "a".to_owned()), (Some(b_there), "b".to_owned())]
        );
    }

    #[test]
    fn a_refused_move_listens_where_it_did() {
        let (handle, head) = agent(&[listen_on("127.0.0.31:0", "a")]);
        let before = listening(&handle);
        let [(Some(a), _)] = before[..] else { panic!("one listener") };
        let _taken = std::net::TcpListener::bind(("127.0.0.32", a.port())).expect("take the port");
        let any = SocketAddr::from(([0, 0, 0, 0], a.port()));
        let refused =
            smol::block_on(handle.reload(config(&head, &[listen_on(&any.to_string(), "a")])))
                .expect_err("0.0.0.0 cannot have the port");
        assert!(
            matches!(&refused, Error::Bind { addr, source, .. } if *addr == any && source.kind() == io::ErrorKind::AddrInUse),
            "{refused:?}"
        );
        assert_eq!(listening(&handle), before);
        std::net::TcpStream::connect(a).expect("the forward listens again");
    }
}
