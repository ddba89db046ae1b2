//! The `postern` command line: parse arguments, load config, call the library.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use futures_lite::{future, StreamExt};
use lexopt::prelude::*;
use log::LevelFilter;

#[cfg(feature = "agent")]
use postern::config::AgentConfig;
#[cfg(feature = "station")]
use postern::config::StationConfig;
use postern::config::{self, CarrierKind};
use postern::keys::PrivateKey;

/// One subcommand's help: the line in `postern --help` and the whole of
/// `postern SUB --help`. A build without the command keeps only its
/// summary: the device's binary is counted in KiB. The man page is generated from these texts
/// (scripts/package), so they are the one description of the CLI.
struct Help {
    name: &'static str,
    /// How it is called, as the overview lists it.
    usage: &'static str,
    summary: &'static str,
    /// What it does, below the usage line of `postern SUB --help`.
    about: &'static str,
    /// Its own option lines, above the common ones.
    options: &'static str,
    /// Below the options: environment, signals.
    notes: &'static str,
}

const COMMANDS: &[Help] = &[
    Help {
        name: "genkey",
        usage: "postern genkey [-o FILE]",
        summary: "print a new base64 private key, or write it to FILE (mode 0600)",
        about: "\
A station's or a device's X25519 private key, from the system's random
source. Give the other side its public half: postern pubkey < FILE.
",
        options: "  -o, --output FILE   write the key to FILE, created with mode 0600; an
                      existing FILE is never replaced
",
        notes: "\
Printed to stdout, the key is only as private as where it goes: a warning
names a world-readable file (use umask 077, or -o).
",
    },
    Help {
        name: "pubkey",
        usage: "postern pubkey < KEY",
        summary: "print the base64 public key of a private key",
        about: "\
Reads a private key (as genkey writes it) from stdin and prints its public
key: a device's goes into the station's [[devices]], the station's into
each agent's station_public_key.
",
        options: "",
        notes: "",
    },
    Help {
        name: "station",
        usage: "postern station -c FILE.toml",
        summary: "run the station (central side)",
        about: if cfg!(feature = "station") {
            "\
Listens for agents' carriers, admits the devices FILE lists, connects their
streams to the targets it names and serves their reverse services.
"
        } else {
            ""
        },
        options: if cfg!(feature = "station") {
            "  -c, --config FILE   the station config (README.md, \"Station config\")\n"
        } else {
            ""
        },
        notes: if cfg!(feature = "station") {
            "\
Signals: SIGHUP rereads FILE (devices, targets, keys, certificate; a
refused config leaves the running one in place); SIGTERM and SIGINT stop,
giving open streams 10 s to finish. Under a Type=notify unit it reports
READY=1, RELOADING=1, STOPPING=1 and WATCHDOG=1.
"
        } else {
            ""
        },
    },
    Help {
        name: "agent",
        usage: "postern agent -c FILE.toml",
        summary: "run the agent (device side)",
        about: "\
Connects to the station over HTTP (through a proxy when FILE or the
environment names one), forwards the local listeners and serial lines FILE
lists, and serves its services to the station.
",
        options: "  -c, --config FILE   the agent config (README.md, \"Agent config\")\n",
        notes: "\
Environment: HTTP_PROXY/http_proxy (HTTPS_PROXY/https_proxy for an
https:// station), honouring NO_PROXY, when FILE names no proxy.
Signals: SIGHUP rereads FILE: forwards, services and keys apply at once,
untouched streams carry on, other changes are named as needing a
restart, and a refused config leaves the running one in place; SIGTERM
and SIGINT stop, giving open streams 10 s to finish. Under a Type=notify unit it
reports READY=1, RELOADING=1, STOPPING=1 and WATCHDOG=1.
",
    },
    Help {
        name: "check",
        usage: "postern check -c FILE.toml",
        summary: "validate a station or agent config; non-zero exit with the reason",
        about: "\
Reads FILE as the station or agent would, keys and proxy included, and says
which it is; exits 1 with the reason when either would refuse it.
",
        options: "  -c, --config FILE   the config to check\n",
        notes: "",
    },
    Help {
        name: "status",
        usage: "postern status -c FILE.toml",
        summary: "ask the running station or agent of FILE how it is doing",
        about: "\
Asks the status listener FILE names (status = \"ADDR\") for its summary:
the agent's session, carrier and why, lanes, streams, bytes, reconnects,
last error and when the station was last heard; the station's devices.
The same figures are on that listener as /metrics (Prometheus text);
a station's also as /status (JSON).
",
        options: "  -c, --config FILE   the config the program runs with\n",
        notes: "",
    },
    Help {
        name: "demo",
        usage: "postern demo [--once] [--carrier auto|stream|poll] [--bytes N]",
        summary: "station + agent + echo target on loopback, nothing to configure",
        about: if cfg!(all(feature = "agent", feature = "station")) {
            "\
Starts a station, an agent and an echo server on loopback with fresh keys,
sends N bytes through the tunnel and checks every byte that comes back.
"
        } else {
            ""
        },
        options: if cfg!(all(feature = "agent", feature = "station")) {
            "  \
      --once          exit after the check instead of keeping the tunnel up
      --carrier KIND  auto (default), stream or poll
      --bytes N       how much to send (default 8 MiB)
"
        } else {
            ""
        },
        notes: "",
    },
];

/// What every subcommand accepts; in `--help` and each `SUB --help`.
const COMMON_OPTIONS: &str = "  -v, --verbose       more log output (-v debug, -vv trace)
  -q, --quiet         less log output (-q warnings, -qq errors only)
  -h, --help          this text; postern COMMAND --help for one command
  -V, --version       the version, the commit and the cargo features built in
";

/// Below the options of every help text.
const LOGS: &str = "\
Logs go to stderr (with syslog priorities when stderr is the journal);
POSTERN_LOG=error|warn|info|debug|trace overrides -v/-q.
";

fn print_help(command: Option<&Help>) {
    match command {
        Some(help) => {
            let notes =
                if help.notes.is_empty() { String::new() } else { format!("{}\n", help.notes) };
            print!(
                "Usage: {}\n\n{}\nOptions:\n{}{COMMON_OPTIONS}\n{notes}{LOGS}",
                help.usage, help.about, help.options
            );
        }
        None => {
            println!(
                "postern: carries TCP and serial byte streams through firewalls that only let \
                 HTTP out\n\nUsage:"
            );
            for help in COMMANDS {
                println!("  {}\n      {}", help.usage, help.summary);
            }
            print!(
                "\nOptions:\n{COMMON_OPTIONS}\n{LOGS}\nSee README.md for the config files; \
                 postern COMMAND --help for each command.\n"
            );
        }
    }
    // A device build leaves the station out; say so here rather than only
    // when `station` or `demo` is run.
    if !cfg!(feature = "station") {
        println!("\nThis build has no station: `station` and `demo` are not available.");
    }
    if !cfg!(feature = "agent") {
        println!("\nThis build has no agent: `agent` and `demo` are not available.");
    }
}

enum Command {
    /// To stdout, or to a new file.
    Genkey(Option<PathBuf>),
    Pubkey,
    Station(PathBuf),
    Agent(PathBuf),
    Check(PathBuf),
    Status(PathBuf),
    /// `bytes: None` means the demo's default amount.
    Demo {
        once: bool,
        carrier: CarrierKind,
        bytes: Option<u64>,
    },
}

/// A command line that cannot be run, with the reason to print.
struct Usage(String);

/// Why a command failed, printed as `postern: <it>`.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot write {what} to stdout: {source}")]
    Stdout { what: &'static str, source: std::io::Error },
    #[error("{} exists; genkey never replaces a key (remove the file first)", .0.display())]
    KeyFileExists(PathBuf),
    #[error("cannot create {}: {source}", path.display())]
    CreateKeyFile { path: PathBuf, source: std::io::Error },
    #[error("cannot write the new key to {}: {source}", path.display())]
    WriteKeyFile { path: PathBuf, source: std::io::Error },
    #[error("cannot read a private key from stdin: {0}")]
    ReadStdin(std::io::Error),
    #[error("stdin is not a private key: {0}")]
    NotAKey(postern::keys::KeyError),
    #[error(
        "{} names no status listener; add status = \"127.0.0.1:9091\" and restart the program \
         to ask it",
        .0.display()
    )]
    NoStatusListener(PathBuf),
    #[error(
        "{}: status = \"{addr}\" takes a port the system picks at start; name a fixed port to \
         ask the program with postern status",
        path.display()
    )]
    StatusPortPicked { path: PathBuf, addr: std::net::SocketAddr },
    #[error(transparent)]
    Status(#[from] postern::status::FetchError),
    #[cfg(any(feature = "agent", feature = "station"))]
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[cfg(feature = "station")]
    #[error(transparent)]
    Station(#[from] postern::station::Error),
    #[cfg(feature = "agent")]
    #[error(transparent)]
    Agent(#[from] postern::agent::Error),
    #[cfg(all(feature = "agent", feature = "station"))]
    #[error(transparent)]
    Demo(#[from] postern::demo::DemoError),
    #[cfg(all(feature = "agent", feature = "station"))]
    #[error("the bytes that came back differ from the bytes sent")]
    DemoDiffers,
    /// A command this build left out (a device's build has no station).
    #[cfg(not(all(feature = "agent", feature = "station")))]
    #[error("this build has no {0} (built without the `{0}` feature)")]
    NotBuilt(&'static str),
    #[cfg(not(all(feature = "agent", feature = "station")))]
    #[error("the demo needs both the `agent` and `station` features")]
    NoDemo,
}

impl From<lexopt::Error> for Usage {
    fn from(e: lexopt::Error) -> Self {
        Usage(e.to_string())
    }
}

fn main() -> ExitCode {
    let (command, level) = match parse_args() {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return ExitCode::SUCCESS,
        Err(Usage(reason)) => {
            eprintln!("postern: {reason}\nTry 'postern --help'.");
            return ExitCode::from(2);
        }
    };
    postern::logger::init(level);
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("postern: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok(None)` when `--help` or `--version` was answered.
fn parse_args() -> Result<Option<(Command, LevelFilter)>, Usage> {
    let mut parser = lexopt::Parser::from_env();
    let mut subcommand: Option<String> = None;
    let mut config: Option<PathBuf> = None;
    let mut verbosity: i32 = 0;
    let mut once = false;
    let mut carrier = CarrierKind::Auto;
    let mut bytes: Option<u64> = None;
    let mut output: Option<PathBuf> = None;
    let mut help = false;
    while let Some(arg) = parser.next()? {
        match arg {
            // After the loop: `postern -h station` and `postern station -h`
            // both mean station's help.
            Short('h') | Long("help") => help = true,
            Short('V') | Long("version") => {
                println!(
                    "postern {} (commit {}; features: {})",
                    env!("CARGO_PKG_VERSION"),
                    postern::COMMIT,
                    postern::FEATURES.join(", ")
                );
                return Ok(None);
            }
            Short('o') | Long("output") => output = Some(parser.value()?.into()),
            Short('v') | Long("verbose") => verbosity += 1,
            Short('q') | Long("quiet") => verbosity -= 1,
            Short('c') | Long("config") => config = Some(parser.value()?.into()),
            Long("once") => once = true,
            Long("carrier") => {
                carrier = match parser.value()?.string()?.as_str() {
                    "auto" => CarrierKind::Auto,
                    "stream" => CarrierKind::Stream,
                    "poll" => CarrierKind::Poll,
                    other => {
                        return Err(Usage(format!(
                            "--carrier {other:?}: expected auto, stream or poll"
                        )))
                    }
                }
            }
            Long("bytes") => {
                let text = parser.value()?.string()?;
                bytes =
                    Some(text.parse().map_err(|_| {
                        Usage(format!("--bytes {text:?}: expected a number of bytes"))
                    })?);
            }
            Value(value) if subcommand.is_none() => {
                let name = value.string()?;
                // `postern help [COMMAND]`, as git and cargo take it.
                if name == "help" && !help {
                    help = true;
                } else {
                    subcommand = Some(name);
                }
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    let level = match verbosity {
        i32::MIN..=-2 => LevelFilter::Error,
        -1 => LevelFilter::Warn,
        0 => LevelFilter::Info,
        1 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    if help {
        let command = match subcommand.as_deref() {
            None => None,
            Some(name) => Some(
                COMMANDS
                    .iter()
                    .find(|help| help.name == name)
                    .ok_or_else(|| Usage(format!("unknown command {name:?}")))?,
            ),
        };
        print_help(command);
        return Ok(None);
    }
    let Some(name) = subcommand else {
        return Err(Usage("no command given".into()));
    };
    if output.is_some() && name != "genkey" {
        return Err(Usage(format!("-o applies only to genkey, not {name}")));
    }
    let needs_config =
        |what: &str| config.clone().ok_or_else(|| Usage(format!("{what} needs -c FILE.toml")));
    let demo_only = once || carrier != CarrierKind::Auto || bytes.is_some();
    if demo_only && name != "demo" {
        return Err(Usage(format!("--once, --carrier and --bytes apply only to demo, not {name}")));
    }
    let command = match name.as_str() {
        "genkey" => Command::Genkey(output),
        "pubkey" => Command::Pubkey,
        "station" => Command::Station(needs_config("station")?),
        "agent" => Command::Agent(needs_config("agent")?),
        "check" => Command::Check(needs_config("check")?),
        "status" => Command::Status(needs_config("status")?),
        "demo" => Command::Demo { once, carrier, bytes },
        other => return Err(Usage(format!("unknown command {other:?}"))),
    };
    if config.is_some()
        && matches!(command, Command::Genkey(_) | Command::Pubkey | Command::Demo { .. })
    {
        return Err(Usage(format!("{name} takes no config file")));
    }
    Ok(Some((command, level)))
}

/// Writes `line` to stdout: a key lost to a full disk or a closed pipe is
/// an error to report, not a panic (println! panics).
fn print_line(line: &str, what: &'static str) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|source| Failure::Stdout { what, source })
}

/// `wg genkey`'s warning: a private key printed into a file others can
/// read is no longer private.
fn warn_if_world_readable(out: &impl std::os::fd::AsFd) {
    let Ok(stat) = rustix::fs::fstat(out) else { return };
    let mode = rustix::fs::FileType::from_raw_mode(stat.st_mode);
    if mode == rustix::fs::FileType::RegularFile && stat.st_mode & 0o004 != 0 {
        eprintln!(
            "postern: warning: writing a private key to a world-readable file; \
             use umask 077 or postern genkey -o FILE"
        );
    }
}

/// Writes a new key to a new file only its owner can read. A file that
/// could not be written whole is removed: an empty or cut key file would
/// be found later, as a confusing config error.
fn write_key(path: &std::path::Path, key: &PrivateKey) -> Result<(), Failure> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(
            |source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => Failure::KeyFileExists(path.to_owned()),
                _ => Failure::CreateKeyFile { path: path.to_owned(), source },
            },
        )?;
    let written = writeln!(file, "{}", key.to_base64()).and_then(|()| file.sync_all());
    written.map_err(|source| {
        let _ = std::fs::remove_file(path);
        Failure::WriteKeyFile { path: path.to_owned(), source }
    })
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Genkey(None) => {
            warn_if_world_readable(&std::io::stdout());
            print_line(&PrivateKey::generate().to_base64(), "the new key")
        }
        Command::Genkey(Some(path)) => write_key(&path, &PrivateKey::generate()),
        Command::Pubkey => {
            let mut text = String::new();
            // A key is 44 characters; read a little more to say "too long".
            std::io::stdin().take(4096).read_to_string(&mut text).map_err(Failure::ReadStdin)?;
            let key = PrivateKey::from_base64(&text).map_err(Failure::NotAKey)?;
            print_line(&key.public_key().to_base64(), "the public key")
        }
        Command::Check(path) => match config::load_any(&path)? {
            config::AnyConfig::Station(station) => {
                println!(
                    "{}: station config OK ({} devices, {} targets)",
                    path.display(),
                    station.devices.len(),
                    station.targets.len()
                );
                Ok(())
            }
            config::AnyConfig::Agent(agent) => {
                let route = match config::agent_proxy(&agent)? {
                    Some(proxy) => format!("through proxy {}:{}", proxy.host, proxy.port),
                    None => "direct".to_owned(),
                };
                println!(
                    "{}: agent config OK ({} forwards, {} services; {route})",
                    path.display(),
                    agent.forwards.len(),
                    agent.services.len()
                );
                Ok(())
            }
        },
        Command::Status(path) => status(&path),
        Command::Station(path) => station(path),
        Command::Agent(path) => agent(path),
        Command::Demo { once, carrier, bytes } => demo(once, carrier, bytes),
    }
}

/// Longest status summary read: a station's lists every device.
const MAX_STATUS_BYTES: u64 = 16 << 20;

/// Prints the summary of the running program whose config is `path`.
fn status(path: &std::path::Path) -> Result<(), Failure> {
    let addr = match config::load_any(path)? {
        config::AnyConfig::Station(station) => station.status,
        config::AnyConfig::Agent(agent) => agent.status,
    };
    let Some(mut addr) = addr else {
        return Err(Failure::NoStatusListener(path.to_owned()));
    };
    if addr.port() == 0 {
        return Err(Failure::StatusPortPicked { path: path.to_owned(), addr });
    }
    // Listening on every address includes loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let summary = postern::status::fetch(addr, "/status.txt", MAX_STATUS_BYTES)?;
    print_line(summary.trim_end(), "the status")
}

/// Runs the station or agent as a task of the executor and waits for it.
///
/// Every task of the program then runs on the executor's thread, which also
/// waits for I/O when it has nothing to run. With `smol::block_on` here the
/// main thread would drive I/O and run the top-level future (the agent's
/// session timers) while the executor thread ran the lanes and pumps: each
/// readiness event and timer change crossed threads with a futex wake and a
/// context switch.
#[cfg(any(feature = "station", feature = "agent"))]
fn run_on_executor<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    futures_lite::future::block_on(postern::task::spawn(work))
}

#[cfg(feature = "station")]
fn station(path: PathBuf) -> Result<(), Failure> {
    let config = postern::station::Handle::load_checked(&path)?;
    let mut signals = signals()?;
    run_on_executor(async move {
        let station = postern::station::Station::bind(config).await?;
        let handle = station.handle();
        serve(station.run(), &handle, &path, &mut signals).await;
        Ok(())
    })
}

/// What a running agent or station does on a signal.
#[cfg(any(feature = "agent", feature = "station"))]
trait Controlled {
    type Config;
    /// Reads and checks the config file at `path`.
    fn load_checked(path: &std::path::Path) -> Result<Self::Config, Failure>;
    fn reload(
        &self,
        config: Self::Config,
    ) -> impl std::future::Future<Output = Result<Vec<String>, Failure>> + Send;
    /// A reload's config was refused: counted for the operator.
    fn reload_failed(&self);
    fn drain(&self, limit: std::time::Duration) -> impl std::future::Future<Output = ()> + Send;
}

#[cfg(feature = "station")]
impl Controlled for postern::station::Handle {
    type Config = StationConfig;
    fn load_checked(path: &std::path::Path) -> Result<StationConfig, Failure> {
        Ok(StationConfig::load(path)?)
    }
    async fn reload(&self, config: StationConfig) -> Result<Vec<String>, Failure> {
        Ok(postern::station::Handle::reload(self, config).await?)
    }
    fn reload_failed(&self) {
        postern::station::Handle::reload_failed(self);
    }
    async fn drain(&self, limit: std::time::Duration) {
        postern::station::Handle::drain(self, limit).await;
    }
}

#[cfg(feature = "agent")]
impl Controlled for postern::agent::Handle {
    type Config = AgentConfig;
    /// The proxy from the environment is part of the config.
    fn load_checked(path: &std::path::Path) -> Result<AgentConfig, Failure> {
        let mut config = AgentConfig::load(path)?;
        config.proxy = config::agent_proxy(&config)?;
        Ok(config)
    }
    async fn reload(&self, config: AgentConfig) -> Result<Vec<String>, Failure> {
        Ok(postern::agent::Handle::reload(self, config).await?)
    }
    fn reload_failed(&self) {
        postern::agent::Handle::reload_failed(self);
    }
    async fn drain(&self, limit: std::time::Duration) {
        postern::agent::Handle::drain(self, limit).await;
    }
}

/// Runs `program` until SIGTERM or SIGINT drains it, reloading its config
/// from `path` on SIGHUP, and tells systemd each step.
#[cfg(any(feature = "agent", feature = "station"))]
async fn serve<H: Controlled>(
    program: impl std::future::Future<Output = ()>,
    handle: &H,
    path: &std::path::Path,
    signals: &mut async_signal::Signals,
) {
    use async_signal::Signal;
    let notifier = postern::notify::Notifier::from_env();
    notifier.ready();
    let control = async {
        while let Some(Ok(signal)) = signals.next().await {
            if signal != Signal::Hup {
                log::info!("{signal:?}: stopping");
                notifier.stopping();
                handle.drain(DRAIN_LIMIT).await;
                return;
            }
            notifier.reloading();
            log::info!("SIGHUP: reloading {}", path.display());
            let reloaded = match H::load_checked(path) {
                Ok(config) => handle.reload(config).await,
                Err(e) => {
                    handle.reload_failed();
                    Err(e)
                }
            };
            log_reload(reloaded);
            notifier.ready();
        }
    };
    future::or(future::or(program, notifier.keep_watchdog()), control).await;
}

/// The log lines of a SIGHUP: what changed, or why nothing did.
#[cfg(any(feature = "agent", feature = "station"))]
fn log_reload(reloaded: Result<Vec<String>, Failure>) {
    match reloaded {
        Ok(changes) if changes.is_empty() => log::info!("reloaded: nothing changed"),
        Ok(changes) => {
            for change in changes {
                log::info!("reloaded: {change}");
            }
        }
        Err(e) => log::error!("reload refused, the running config stays: {e}"),
    }
}

/// Time streams get to finish after SIGTERM before they are closed.
#[cfg(any(feature = "agent", feature = "station"))]
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Catches the signals [`serve`] obeys from now on (SIGHUP would
/// otherwise end the process).
#[cfg(any(feature = "agent", feature = "station"))]
fn signals() -> Result<async_signal::Signals, Failure> {
    use async_signal::Signal;
    async_signal::Signals::new([Signal::Hup, Signal::Term, Signal::Int]).map_err(Failure::Signals)
}

#[cfg(not(feature = "station"))]
fn station(_: PathBuf) -> Result<(), Failure> {
    Err(Failure::NotBuilt("station"))
}

#[cfg(feature = "agent")]
fn agent(path: PathBuf) -> Result<(), Failure> {
    let config = postern::agent::Handle::load_checked(&path)?;
    let mut signals = signals()?;
    run_on_executor(async move {
        let agent = postern::agent::Agent::bind(config).await?;
        let handle = agent.handle();
        serve(agent.run(), &handle, &path, &mut signals).await;
        Ok(())
    })
}

#[cfg(not(feature = "agent"))]
fn agent(_: PathBuf) -> Result<(), Failure> {
    Err(Failure::NotBuilt("agent"))
}

#[cfg(all(feature = "agent", feature = "station"))]
fn demo(once: bool, carrier: CarrierKind, bytes: Option<u64>) -> Result<(), Failure> {
    use postern::demo::{Lab, DEFAULT_BYTES};
    let bytes = bytes.unwrap_or(DEFAULT_BYTES);
    smol::block_on(async {
        let lab = Lab::start(carrier).await?;
        println!(
            "station on {}, agent forwarding {} to the echo target; sending {} bytes...",
            lab.station, lab.forward, bytes
        );
        let report = lab.round_trip(bytes).await?;
        println!("{report}");
        if !report.verified() {
            return Err(Failure::DemoDiffers);
        }
        if once {
            return Ok(());
        }
        println!(
            "\nThe tunnel keeps running. Try it (type a line, it comes back):\n  nc 127.0.0.1 {}\nCtrl-C stops the demo.",
            lab.forward.port()
        );
        std::future::pending::<()>().await;
        Ok(())
    })
}

#[cfg(not(all(feature = "agent", feature = "station")))]
fn demo(_: bool, _: CarrierKind, _: Option<u64>) -> Result<(), Failure> {
    Err(Failure::NoDemo)
}
