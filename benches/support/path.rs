//! The delayed hop of the throughput driver's `-rtt` routes, in two kinds.
//!
//! `relay`: a userspace TCP relay that holds each byte `one_way` each way.
//! Each side's TCP connection to it is on loopback, so a tunnel whose only
//! flow control is TCP's (rathole, the direct route) fills the relay's
//! buffer at loopback speed and never meets slow start or a congestion
//! window; one with its own end-to-end credit (postern) sees the round
//! trip. Unfair to postern, but it needs nothing from the machine.
//!
//! `tun`: a real kernel TCP path. Two network namespaces of this process,
//! joined by a pair of TUN devices whose packets this process moves from
//! one to the other after `one_way` (and, with a rate, at that rate behind
//! a bounded drop-tail queue, as a router does), so the TCP connection
//! that crosses the hop has a real round trip, slow start, congestion
//! window and losses. netem would do this in the kernel, but it is not in
//! every kernel (nor in the one this was written on), and on loopback it
//! would slow every other user of the machine.
//!
//! ```text
//!  caller ─lo─▶ near forwarder ══ ns a: 10.201.0.1 ─tun─[delay line]─tun─ 10.201.0.2: ns b ══▶ far forwarder ─lo─▶ upstream
//! ```
//!
//! The path is split TCP, as a satellite link's performance-enhancing
//! proxy does: the caller's and upstream's connections stay on loopback
//! in the root namespace, and the forwarders, in this process, carry the
//! bytes over one TCP connection per caller connection across the path.
//! Both namespaces are ours, so neither the machine's routes nor its
//! settings change, and both ends of the path get the same TCP settings.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

/// Bytes a relay holds per direction with no rate limit: about what a TCP
/// window lets a sender have in flight on such a path.
pub(crate) const DELAY_BUFFER: usize = 4 << 20;

/// Bytes waiting for a rate-limited hop, as in a router's buffer: a sender
/// that outruns the rate fills it, and then (relay) waits or (tun) loses
/// packets.
pub(crate) const RATE_QUEUE: usize = 256 << 10;

/// MTU of the TUN path: jumbo frames, since each packet costs this process
/// a read and a write. At Ethernet's 1500 the forwarding itself capped the
/// direct route at about 170 MB/s with no delay and 113 MB/s at 20 ms (on
/// 2 shared cores), below what the tunnels reach; at 9000, about 450 MB/s
/// and 150 MB/s (then TCP's send buffer limits it). The cost: a segment
/// carries 6 times the bytes, so slow start grows 6 times faster in bytes
/// than on an Ethernet path, for every route alike.
pub(crate) const MTU: usize = 9000;

/// The two ends of the TUN path, one in each namespace.
const NEAR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const FAR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

/// Prefix of the namespaces' names; the rest is the pid, so that a later
/// run can remove what a killed one left.
const NETNS_PREFIX: &str = "postern-bench-";

/// Which kind of delayed hop the `-rtt` routes cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathKind {
    Tun,
    Relay,
}

impl PathKind {
    pub(crate) fn named(name: &str) -> Option<PathKind> {
        match name {
            "tun" => Some(PathKind::Tun),
            "relay" => Some(PathKind::Relay),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            PathKind::Tun => "tun",
            PathKind::Relay => "relay",
        }
    }

    /// `Tun` if this machine can set the path up, else `Relay` and why not.
    pub(crate) fn default_here() -> Result<PathKind, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".to_owned());
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| format!("/dev/net/tun: {e}"))?;
        ip(&["netns", "list"])?;
        Ok(PathKind::Tun)
    }
}

/// What the delayed hop does to bytes: hold them `one_way` each way, and at
/// `rate` bytes per second, move no faster; `path` says how.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hop {
    pub(crate) one_way: Duration,
    pub(crate) rate: Option<f64>,
    pub(crate) path: PathKind,
}

/// A delayed hop in front of `upstream`: connect to `addr` (on 127.0.0.1)
/// to reach it. Stopped on drop; the last hop on the TUN path removes it.
pub(crate) struct DelayedHop {
    pub(crate) addr: SocketAddr,
    // Dropped in this order: the forwarders, then the path they cross.
    _forwarders: Vec<Forwarder>,
    _network: Option<Arc<Network>>,
}

impl DelayedHop {
    pub(crate) fn start(upstream: SocketAddr, hop: Hop) -> Result<DelayedHop, String> {
        let loopback = || TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string());
        match hop.path {
            PathKind::Relay => {
                let relay = Forwarder::start(loopback()?, None, upstream, move |from, to| {
                    relay(from, to, hop)
                })?;
                Ok(DelayedHop { addr: relay.addr, _forwarders: vec![relay], _network: None })
            }
            PathKind::Tun => {
                let network = Network::shared(hop)?;
                // The far forwarder listens in namespace b and connects to
                // upstream from the root namespace; the near one listens on
                // loopback and connects across the path from namespace a.
                let far = Forwarder::start(network.listen_far()?, None, upstream, copy)?;
                let near = Forwarder::start(loopback()?, Some(network.netns('a')), far.addr, copy)?;
                Ok(DelayedHop {
                    addr: near.addr,
                    _forwarders: vec![near, far],
                    _network: Some(network),
                })
            }
        }
    }
}

/// Accepts connections and joins each to a new one to `upstream`, moving
/// the bytes with `relay` each way.
struct Forwarder {
    addr: SocketAddr,
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
}

impl Forwarder {
    /// `netns`: the namespace to connect to upstream from (a socket
    /// belongs to the namespace of the thread that creates it), if not
    /// the root one.
    fn start(
        listener: TcpListener,
        netns: Option<String>,
        upstream: SocketAddr,
        relay: impl Fn(TcpStream, TcpStream) + Send + 'static,
    ) -> Result<Forwarder, String> {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let (accepting, stopped) = (listener.clone(), stop.clone());
        let (ready, entered) = mpsc::channel();
        thread::spawn(move || {
            let entered_netns = netns.as_deref().map_or(Ok(()), enter_netns);
            let failed = entered_netns.is_err();
            let _ = ready.send(entered_netns);
            if failed {
                return;
            }
            for client in accepting.incoming() {
                if stopped.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else { continue };
                    relay(from, to);
                }
            }
        });
        entered.recv().map_err(|e| e.to_string())??;
        Ok(Forwarder { addr, listener, stop })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop so it sees the flag: accept on a listener
        // shut down fails at once (Linux). Connecting would not do, as the
        // far forwarder's address is only reachable across the path.
        // SAFETY: the fd is open, held by the Arc.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// Copies bytes from `from` to `to` as they come; ends with a half-close.
fn copy(from: TcpStream, to: TcpStream) {
    let mut from = from;
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        deliver(
            to,
            std::iter::from_fn(|| match from.read(&mut buf) {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buf[..n].to_vec()),
            }),
        );
    });
}

/// Writes `chunks` to `to` and then half-closes it; stops at an error.
fn deliver(mut to: TcpStream, chunks: impl IntoIterator<Item = Vec<u8>>) {
    let _ = to.set_nodelay(true);
    for chunk in chunks {
        if to.write_all(&chunk).is_err() {
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Moves bytes from `from` to `to` as the relay hop does: each `one_way`
/// after it arrived, no faster than the rate; ends with a half-close.
fn relay(mut from: TcpStream, to: TcpStream, hop: Hop) {
    // The channel bound is the relay's buffer: bytes on the wire plus,
    // with a rate, the queue in front of it. Chunks are small enough that
    // the bound is close to exact.
    const CHUNK: usize = 16 << 10;
    let buffer = match hop.rate {
        Some(rate) => (rate * hop.one_way.as_secs_f64()) as usize + RATE_QUEUE,
        None => DELAY_BUFFER,
    };
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>((buffer / CHUNK).max(2));
    thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        // When the hop's line is free again (rate-limited hops only).
        let mut line_free = Instant::now();
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let now = Instant::now();
                    let sent = match hop.rate {
                        Some(rate) => {
                            line_free =
                                line_free.max(now) + Duration::from_secs_f64(n as f64 / rate);
                            line_free
                        }
                        None => now,
                    };
                    if tx.send((sent + hop.one_way, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping the sender tells the writer the stream ended.
    });
    thread::spawn(move || {
        deliver(
            to,
            rx.into_iter().map(|(due, bytes)| {
                thread::sleep(due.saturating_duration_since(Instant::now()));
                bytes
            }),
        );
    });
}

/// The TUN path: namespaces `postern-bench-<pid>-a` and `-b`, a TUN device
/// in each (10.201.0.1/30 in a, 10.201.0.2/30 in b), and the threads that
/// move packets between them. One per process, shared by every hop that
/// needs it (the bench measures one route at a time, so they do not
/// compete); removed when the last hop is dropped.
struct Network {
    name: String,
    stop: Arc<AtomicBool>,
    /// Packets the rate-limited queue dropped, per direction (a to b, b to a).
    dropped: [Arc<AtomicU64>; 2],
    threads: Vec<thread::JoinHandle<()>>,
    hop: Hop,
}

/// The network while some hop uses it.
static NETWORK: Mutex<Weak<Network>> = Mutex::new(Weak::new());

impl Network {
    /// The process's path, set up for `hop` if there is none yet.
    fn shared(hop: Hop) -> Result<Arc<Network>, String> {
        let mut shared = NETWORK.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(network) = shared.upgrade() {
            if network.hop.one_way != hop.one_way || network.hop.rate != hop.rate {
                return Err(format!("the TUN path is set up for {:?}, not {hop:?}", network.hop));
            }
            return Ok(network);
        }
        let network = Arc::new(Network::set_up(hop)?);
        *shared = Arc::downgrade(&network);
        Ok(network)
    }

    fn set_up(hop: Hop) -> Result<Network, String> {
        remove_stale_namespaces();
        let pid = std::process::id();
        let name = format!("{NETNS_PREFIX}{pid}");
        let mut network = Network {
            name,
            stop: Arc::new(AtomicBool::new(false)),
            dropped: Default::default(),
            threads: Vec::new(),
            hop,
        };
        // From here on, dropping `network` on an error removes what is made.
        let mut tuns = Vec::new();
        for (side, addr) in [('a', NEAR), ('b', FAR)] {
            let netns = network.netns(side);
            ip(&["netns", "add", &netns])?;
            // Created in the root namespace, then moved: the device stays
            // ours (it goes when its fd is closed) wherever it is.
            let dev = format!("pb{side}{pid}");
            tuns.push(open_tun(&dev)?);
            ip(&["link", "set", "dev", &dev, "netns", &netns])?;
            let mtu = MTU.to_string();
            ip(&["-n", &netns, "addr", "add", &format!("{addr}/30"), "dev", &dev])?;
            ip(&["-n", &netns, "link", "set", "dev", &dev, "mtu", &mtu, "up"])?;
            ip(&["-n", &netns, "link", "set", "dev", "lo", "up"])?;
            copy_tcp_settings(&netns)?;
        }
        let far = tuns.pop().expect("two made");
        let near = tuns.pop().expect("two made");
        let (near, far) = (Arc::new(near), Arc::new(far));
        for (i, (from, to)) in [(near.clone(), far.clone()), (far, near)].into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let (stop, dropped) = (network.stop.clone(), network.dropped[i].clone());
            network
                .threads
                .push(thread::spawn(move || read_packets(&from, hop, &stop, &dropped, tx)));
            network.threads.push(thread::spawn(move || write_packets(&to, rx)));
        }
        Ok(network)
    }

    /// The name of namespace `side` ('a' or 'b').
    fn netns(&self, side: char) -> String {
        format!("{}-{side}", self.name)
    }

    /// A listener on the far end of the path (in namespace b).
    fn listen_far(&self) -> Result<TcpListener, String> {
        let netns = self.netns('b');
        // A thread of its own, since it enters the namespace for good.
        thread::spawn(move || {
            enter_netns(&netns)?;
            TcpListener::bind((FAR, 0)).map_err(|e| format!("listening on {FAR}: {e}"))
        })
        .join()
        .map_err(|_| "the listening thread panicked".to_owned())?
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // The TUN devices went with their fds; the namespaces go with their
        // names once nothing else holds them.
        for side in ['a', 'b'] {
            let _ = ip(&["netns", "del", &self.netns(side)]);
        }
        let dropped: Vec<u64> = self.dropped.iter().map(|d| d.load(Ordering::Relaxed)).collect();
        if dropped.iter().any(|&d| d > 0) {
            eprintln!(
                "tun path: the {} KiB queue dropped {} packets near to far, {} far to near",
                RATE_QUEUE >> 10,
                dropped[0],
                dropped[1]
            );
        }
    }
}

/// Reads the packets one namespace sends from `tun`, and passes each on to
/// the writer with the time it is due at the other end: `one_way` after it
/// left the router's queue. With a rate, the queue is what the line has
/// not yet sent; a packet that would overflow it is dropped, as a router
/// does. Due times never decrease, so the writer keeps the packets' order.
fn read_packets(
    tun: &File,
    hop: Hop,
    stop: &AtomicBool,
    dropped: &AtomicU64,
    to_writer: mpsc::Sender<(Instant, Vec<u8>)>,
) {
    let mut buf = vec![0u8; MTU + 64];
    // When the line has sent everything queued so far.
    let mut line_free = Instant::now();
    while !stop.load(Ordering::Acquire) {
        // Polled with a timeout so that the thread sees `stop`.
        let mut poll = libc::pollfd { fd: tun.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, 100) } <= 0 {
            continue;
        }
        let n = match (&*tun).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let now = Instant::now();
        let sent = match hop.rate {
            Some(rate) => {
                let queued = line_free.saturating_duration_since(now).as_secs_f64() * rate;
                if queued + n as f64 > RATE_QUEUE as f64 {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                line_free = line_free.max(now) + Duration::from_secs_f64(n as f64 / rate);
                line_free
            }
            None => now,
        };
        if to_writer.send((sent + hop.one_way, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

/// Writes each packet into `tun` (the other namespace receives it) when due.
fn write_packets(tun: &File, packets: mpsc::Receiver<(Instant, Vec<u8>)>) {
    for (due, packet) in packets {
        thread::sleep(due.saturating_duration_since(Instant::now()));
        // A packet the stack refuses is lost, as on a wire.
        let _ = (&*tun).write(&packet);
    }
}

/// Opens TUN device `name`: IP packets, no extra header.
fn open_tun(name: &str) -> Result<File, String> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    // struct ifreq: the name, then a union of which TUNSETIFF reads the flags.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _rest: [u8; 22],
    }
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _rest: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req.flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is laid out as.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(format!("TUNSETIFF {name}: {}", io::Error::last_os_error()));
    }
    Ok(tun)
}

/// Moves the calling thread into namespace `netns` (made by `ip netns add`).
fn enter_netns(netns: &str) -> Result<(), String> {
    let path = format!("/var/run/netns/{netns}");
    let file = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: a valid namespace fd; only this thread changes namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {netns}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Gives namespace `netns` the machine's TCP settings (a new namespace
/// starts from the kernel's defaults), so the path's TCP is the one this
/// machine would use on a real path, the same at both ends. One setting
/// differs: no metrics saved per destination, so that every connection
/// starts from slow start whatever crossed the path before it, and rows do
/// not depend on the order they run in.
fn copy_tcp_settings(netns: &str) -> Result<(), String> {
    let mut settings = vec!["net.ipv4.tcp_no_metrics_save=1".to_owned()];
    for key in ["tcp_rmem", "tcp_wmem", "tcp_congestion_control", "tcp_slow_start_after_idle"] {
        let path = format!("/proc/sys/net/ipv4/{key}");
        let value = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        settings.push(format!(
            "net.ipv4.{key}={}",
            value.split_whitespace().collect::<Vec<_>>().join(" ")
        ));
    }
    let mut args = vec!["netns", "exec", netns, "sysctl", "-q", "-w"];
    args.extend(settings.iter().map(String::as_str));
    ip(&args)
}

/// Runs `ip ARGS`; its stderr is the error.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Removes the namespaces of runs that were killed before they could.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(pid) = name.strip_prefix(NETNS_PREFIX).and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        // Gone, or a zombie its parent has not reaped yet (state Z, the
        // field after the parenthesised command name).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        if matches!(state, None | Some("Z")) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}
