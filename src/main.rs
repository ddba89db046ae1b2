//! The `postern` command line: parse arguments, load config, call the library.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use futures_lite::{future, StreamExt};
use lexopt::prelude::*;
use log::LevelFilter;

use postern::config::{self, CarrierKind};
use postern::keys::PrivateKey;
use postern::FEATURES;

const HELP: &str = "\
postern — carries TCP and serial byte streams through firewalls that only let HTTP out

Usage:
  postern genkey                 print a new base64 private key
  postern pubkey < KEY           print the base64 public key of a private key
  postern station -c FILE.toml   run the station (central side)
  postern agent -c FILE.toml     run the agent (device side)
  postern check -c FILE.toml     validate a station or agent config; non-zero exit with the reason
  postern demo [--once] [--carrier auto|stream|poll] [--bytes N]
                                 station + agent + echo target on loopback, nothing to configure

Options:
  -c, --config FILE   config file (station, agent, check)
  -v, --verbose       more log output (-v debug, -vv trace)
  -q, --quiet         less log output (-q warnings, -qq errors only)
  -h, --help          this text
  -V, --version       the version and the cargo features built in

Logs go to stderr; POSTERN_LOG=error|warn|info|debug|trace overrides -v/-q.
The agent uses HTTP_PROXY/http_proxy (HTTPS_PROXY/https_proxy for an https://
station), honouring NO_PROXY, when its config names no proxy; check applies
it too. SIGHUP reloads the station's config and the agent's keys.
See README.md for the config files.
";

enum Command {
    Genkey,
    Pubkey,
    Station(PathBuf),
    Agent(PathBuf),
    Check(PathBuf),
    /// `bytes: None` means the demo's default amount.
    Demo {
        once: bool,
        carrier: CarrierKind,
        bytes: Option<u64>,
    },
}

/// A command line that cannot be run, with the reason to print.
struct Usage(String);

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
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => {
                print!("{HELP}");
                // A device build leaves the station out; say so here rather
                // than only when `station` or `demo` is run.
                if !cfg!(feature = "station") {
                    println!(
                        "\nThis build has no station: `station` and `demo` are not available."
                    );
                }
                if !cfg!(feature = "agent") {
                    println!("\nThis build has no agent: `agent` and `demo` are not available.");
                }
                return Ok(None);
            }
            Short('V') | Long("version") => {
                println!(
                    "postern {} (features: {})",
                    env!("CARGO_PKG_VERSION"),
                    FEATURES.join(", ")
                );
                return Ok(None);
            }
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
            Value(value) if subcommand.is_none() => subcommand = Some(value.string()?),
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
    let Some(name) = subcommand else {
        return Err(Usage("no command given".into()));
    };
    let needs_config =
        |what: &str| config.clone().ok_or_else(|| Usage(format!("{what} needs -c FILE.toml")));
    let demo_only = once || carrier != CarrierKind::Auto || bytes.is_some();
    if demo_only && name != "demo" {
        return Err(Usage(format!("--once, --carrier and --bytes apply only to demo, not {name}")));
    }
    let command = match name.as_str() {
        "genkey" => Command::Genkey,
        "pubkey" => Command::Pubkey,
        "station" => Command::Station(needs_config("station")?),
        "agent" => Command::Agent(needs_config("agent")?),
        "check" => Command::Check(needs_config("check")?),
        "demo" => Command::Demo { once, carrier, bytes },
        other => return Err(Usage(format!("unknown command {other:?}"))),
    };
    if config.is_some()
        && matches!(command, Command::Genkey | Command::Pubkey | Command::Demo { .. })
    {
        return Err(Usage(format!("{name} takes no config file")));
    }
    Ok(Some((command, level)))
}

/// Writes `line` to stdout: a key lost to a full disk or a closed pipe is
/// an error to report, not a panic (println! panics).
fn print_line(line: &str, what: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write {what} to stdout: {e}"))
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Genkey => print_line(&PrivateKey::generate().to_base64(), "the new key"),
        Command::Pubkey => {
            let mut text = String::new();
            // A key is 44 characters; read a little more to say "too long".
            std::io::stdin()
                .take(4096)
                .read_to_string(&mut text)
                .map_err(|e| format!("cannot read a private key from stdin: {e}"))?;
            let key = PrivateKey::from_base64(&text)
                .map_err(|e| format!("stdin is not a private key: {e}"))?;
            print_line(&key.public_key().to_base64(), "the public key")
        }
        Command::Check(path) => match config::load_any(&path).map_err(|e| e.to_string())? {
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
                let route = match config::agent_proxy(&agent).map_err(|e| e.to_string())? {
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
        Command::Station(path) => station(path),
        Command::Agent(path) => agent(path),
        Command::Demo { once, carrier, bytes } => demo(once, carrier, bytes),
    }
}

/// Runs the station or agent as a task of smol's executor and waits for it.
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
    futures_lite::future::block_on(smol::spawn(work))
}

#[cfg(feature = "station")]
fn station(path: PathBuf) -> Result<(), String> {
    use async_signal::Signal;
    let config = config::StationConfig::load(&path).map_err(|e| e.to_string())?;
    let mut signals = signals(&[Signal::Hup, Signal::Term, Signal::Int])?;
    run_on_executor(async move {
        let station = postern::station::Station::bind(config).await.map_err(|e| e.to_string())?;
        let handle = station.handle();
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
                let reloaded = match config::StationConfig::load(&path) {
                    Ok(config) => handle.reload(config).await.map_err(|e| e.to_string()),
                    Err(e) => {
                        handle.reload_failed();
                        Err(e.to_string())
                    }
                };
                match reloaded {
                    Ok(changes) if changes.is_empty() => log::info!("reloaded: nothing changed"),
                    Ok(changes) => {
                        for change in changes {
                            log::info!("reloaded: {change}");
                        }
                    }
                    Err(e) => log::error!("reload refused, the running config stays: {e}"),
                }
                notifier.ready();
            }
        };
        future::or(future::or(station.run(), notifier.keep_watchdog()), control).await;
        Ok(())
    })
}

/// Time streams get to finish after SIGTERM before they are closed.
#[cfg(any(feature = "agent", feature = "station"))]
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Catches `which` from now on (SIGHUP would otherwise end the process).
#[cfg(any(feature = "agent", feature = "station"))]
fn signals(which: &[async_signal::Signal]) -> Result<async_signal::Signals, String> {
    async_signal::Signals::new(which.iter().copied())
        .map_err(|e| format!("cannot install signal handlers: {e}"))
}

#[cfg(not(feature = "station"))]
fn station(_: PathBuf) -> Result<(), String> {
    Err("this build has no station (built without the `station` feature)".into())
}

#[cfg(feature = "agent")]
fn agent(path: PathBuf) -> Result<(), String> {
    let mut config = config::AgentConfig::load(&path).map_err(|e| e.to_string())?;
    config.proxy = config::agent_proxy(&config).map_err(|e| e.to_string())?;
    use async_signal::Signal;
    let mut signals = signals(&[Signal::Hup, Signal::Term, Signal::Int])?;
    run_on_executor(async move {
        let agent = postern::agent::Agent::bind(config).await.map_err(|e| e.to_string())?;
        let handle = agent.handle();
        let notifier = postern::notify::Notifier::from_env();
        notifier.ready();
        let control = async {
            while let Some(Ok(signal)) = signals.next().await {
                if signal == Signal::Hup {
                    notifier.reloading();
                    log::info!("SIGHUP: reloading the keys of {}", path.display());
                    match config::AgentConfig::load(&path) {
                        Ok(config) => {
                            let changes = handle.reload_keys(&config).await;
                            if changes.is_empty() {
                                log::info!("reloaded: the keys did not change");
                            }
                            for change in changes {
                                log::info!("reloaded: {change}");
                            }
                            log::info!(
                                "reloaded: only keys apply on SIGHUP; restart the agent for \
                                 other changes"
                            );
                        }
                        Err(e) => log::error!("reload refused, the running config stays: {e}"),
                    }
                    notifier.ready();
                    continue;
                }
                log::info!("{signal:?}: stopping");
                notifier.stopping();
                handle.drain(DRAIN_LIMIT).await;
                return;
            }
        };
        future::or(future::or(agent.run(), notifier.keep_watchdog()), control).await;
        Ok(())
    })
}

#[cfg(not(feature = "agent"))]
fn agent(_: PathBuf) -> Result<(), String> {
    Err("this build has no agent (built without the `agent` feature)".into())
}

#[cfg(all(feature = "agent", feature = "station"))]
fn demo(once: bool, carrier: CarrierKind, bytes: Option<u64>) -> Result<(), String> {
    use postern::demo::{Lab, DEFAULT_BYTES};
    let bytes = bytes.unwrap_or(DEFAULT_BYTES);
    smol::block_on(async {
        let lab = Lab::start(carrier).await.map_err(|e| e.to_string())?;
        println!(
            "station on {}, agent forwarding {} to the echo target; sending {} bytes...",
            lab.station, lab.forward, bytes
        );
        let report = lab.round_trip(bytes).await.map_err(|e| e.to_string())?;
        println!("{report}");
        if !report.verified() {
            return Err("the bytes that came back differ from the bytes sent".into());
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
fn demo(_: bool, _: CarrierKind, _: Option<u64>) -> Result<(), String> {
    Err("the demo needs both the `agent` and `station` features".into())
}
