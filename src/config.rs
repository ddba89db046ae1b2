//! `station.toml` and `agent.toml`: text in, typed and checked config out.
//!
//! ```text
//!  file text --toml+serde--> Raw* (strings, deny_unknown_fields)
//!            --validate----> StationConfig / AgentConfig (addresses parsed,
//!                            keys decoded, names cross-checked)
//! ```
//!
//! Everything an operator can get wrong is caught here, before any socket is
//! opened, and reported as a [`ConfigError`] naming the file, the field and
//! what to do, e.g. `station.toml: devices[0].public_key: not valid base64`.
//! `postern check` is this module and nothing else.
//!
//! What this module does not do: resolve host names (a target's host may only
//! resolve at the station, and DNS can change while it runs), open serial
//! ports, or decide whether a forward's target exists (only the station knows
//! its `[targets]`). The one piece of I/O besides reading the file itself is
//! reading `private_key_file`, and [`proxy_from_env`] reads the environment.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::keys::{PrivateKey, PublicKey};

/// Largest config file read. A station entry for one device is ~200 bytes,
/// so this holds tens of thousands of devices and still bounds what a wrong
/// `-c /dev/zero` or a runaway generator can make us allocate.
const MAX_CONFIG_BYTES: u64 = 8 << 20;

/// Largest `private_key_file` read. A key is 44 base64 characters plus a
/// newline; anything much longer is the wrong file.
const MAX_KEY_FILE_BYTES: u64 = 1024;

/// Longest device, target or service name. Names go into log lines, metrics
/// labels and (targets, services) into frames on the wire, so they are kept
/// short; 64 bytes is ample for "site-42-pump-17-modbus".
const MAX_NAME_BYTES: usize = 64;

/// Public keys one device, or the pinned station keys of one agent, may
/// list at once: the current key and the next one while a rotation runs,
/// with room for a rotation that overlaps another.
pub const MAX_KEYS: usize = 4;

/// The HTTP port a URL means when it names none (RFC 9110 section 4.2.1).
const HTTP_DEFAULT_PORT: u16 = 80;

/// The port an https:// URL means when it names none.
const HTTPS_DEFAULT_PORT: u16 = 443;

/// Default of `session_timeout`: long enough to ride out a cellular
/// handover or a proxy restart, short enough that a local connection to a
/// device that is gone for good is closed within minutes.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(300);

/// Bounds of `session_timeout` in seconds: below 10 s a single slow
/// reconnect would end sessions; above a day, dead sessions pin memory.
const SESSION_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 10..=86_400;

/// Default of the agent's `keepalive`: often enough for the 30 s and 60 s
/// idle timeouts of proxies, balancers and NAT tables.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);

/// What the file is reported as when a proxy comes from the environment.
const ENVIRONMENT: &str = "environment";

/// A config problem, phrased for the operator who has to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file as given on the command line, or `environment`.
    pub file: String,
    /// The TOML path of the bad field (`devices[0].public_key`), the
    /// environment variable's name, or empty when the whole file is at fault
    /// (unreadable, or not TOML; then the reason carries line and column).
    pub field: String,
    /// What is wrong and, where it helps, what to write instead.
    pub reason: String,
}

impl ConfigError {
    fn new(file: &str, field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError { file: file.to_owned(), field: field.into(), reason: reason.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file, self.field, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

/// The checked contents of `station.toml`.
#[derive(Debug, Clone)]
pub struct StationConfig {
    /// Where the HTTP carrier listener binds.
    pub listen: SocketAddr,
    /// The station's static Noise key; agents pin its public half.
    pub private_key: PrivateKey,
    /// The key that replaces it, accepted beside it while agents move to
    /// its public half (key rotation, README).
    pub next_private_key: Option<PrivateKey>,
    /// Where `GET /metrics` and `GET /status` are served, if anywhere.
    pub status: Option<SocketAddr>,
    /// How long a device's session (and its streams) outlives the loss of
    /// every carrier connection.
    pub session_timeout: Duration,
    /// Target name -> "host:port" (checked for shape; the host is resolved
    /// when a device opens the target).
    pub targets: BTreeMap<String, String>,
    /// Every device allowed to connect, in file order.
    pub devices: Vec<DeviceConfig>,
    // --- TLS (issue 15) ---
    /// `tls_cert_file` and `tls_key_file`: the carrier listener speaks TLS
    /// with this certificate, read again on SIGHUP. Checked loadable.
    pub tls: Option<TlsFiles>,
    /// Carrier connections open at once, strangers and devices together
    /// (a device keeps two); past it new ones get 503.
    pub max_connections: usize,
    /// `[cluster]`: several stations sharing a session registry, so that any
    /// of them serves any device. `None`: a station on its own.
    pub cluster: Option<ClusterConfig>,
}

/// The `[cluster]` table of a station.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Redis (or Valkey) server holding the registry.
    pub store: StoreAddr,
    /// Where this station listens for the other stations.
    pub peer: SocketAddr,
    /// The address the other stations reach this one at, recorded in the
    /// registry: `peer`, unless it binds every address or port 0 (then the
    /// bound port on `peer`'s IP, see [`ClusterConfig::advertised`]).
    pub advertise: Option<SocketAddr>,
    /// How long a registry record outlives its station's last renewal
    /// (renewed every third of it): a station that dies drops out after this.
    pub record_ttl: Duration,
}

impl ClusterConfig {
    /// What the registry records as this station, once `peer` is bound at
    /// `bound`.
    pub fn advertised(&self, bound: SocketAddr) -> SocketAddr {
        self.advertise.unwrap_or(bound)
    }
}

/// `store = "redis://[:password@]host:port[/db]"`.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreAddr {
    /// "host:port", resolved at each connect.
    pub host_port: String,
    pub password: Option<String>,
    pub db: u32,
}

impl std::fmt::Debug for StoreAddr {
    /// Never prints the password (the config is logged on errors).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for StoreAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "redis://{}/{}", self.host_port, self.db)
    }
}

/// Default `max_connections`: concurrent carrier connections, strangers
/// and devices together. A device keeps two; four thousand devices fit, and
/// file descriptors (often limited to 65536) stay ample.
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;

/// `max_connections`: at least the strangers' own bound plus a few
/// devices, at most what a Linux process may open.
const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<u64> = 512..=1_048_576;

/// Default [`ClusterConfig::record_ttl`]: a dead station's devices are
/// found elsewhere within about this long, and a live one renews its
/// records every 10 s.
pub const DEFAULT_RECORD_TTL: Duration = Duration::from_secs(30);
const RECORD_TTL_RANGE: std::ops::RangeInclusive<u64> = 3..=3600;

/// A station's certificate chain (PEM, leaf first) and private key (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// One `[[devices]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Unique among devices; used in logs and status output.
    pub name: String,
    /// How the station recognises the device: one key, or several while
    /// the device's key is replaced. No two devices share a key.
    pub public_keys: Vec<PublicKey>,
    /// Names from `[targets]` this device may open.
    pub allow: Vec<String>,
    /// Station listener -> name of a service on the device (reverse).
    pub expose: BTreeMap<SocketAddr, String>,
}

/// The checked contents of `agent.toml`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the station is reached over HTTP.
    pub station: StationUrl,
    /// The station's static keys, pinned: no other station is accepted.
    /// Tried in order; more than one while the station's key is replaced.
    pub station_public_keys: Vec<PublicKey>,
    /// This device's static Noise key.
    pub private_key: PrivateKey,
    /// The forward proxy from the file. `None` means the file names none;
    /// the command line then asks [`proxy_from_env`] (the library itself
    /// never reads the environment, so tests and the demo go direct).
    pub proxy: Option<ProxyUrl>,
    /// Which HTTP carrier shape to use.
    pub carrier: CarrierKind,
    /// How long the session (and every local connection in it) outlives
    /// the loss of every carrier connection.
    pub session_timeout: Duration,
    /// `keepalive`: nothing sent for this long sends an empty packet, each
    /// way (the station follows the agent's interval).
    pub keepalive: Duration,
    /// `poll_hold`: the longest the station may hold a poll request.
    pub poll_hold: Duration,
    /// `stream_retry`: how long `auto`, having moved to poll, waits before
    /// it first tries the stream carrier again.
    pub stream_retry: Duration,
    /// Local listeners and serial lines carried to station targets.
    pub forwards: Vec<Forward>,
    /// Service name -> what the station may open here (reverse).
    pub services: BTreeMap<String, Service>,
    /// Where `GET /metrics` and `GET /status.txt` (what `postern status`
    /// prints) are served, if anywhere.
    pub status: Option<SocketAddr>,
    // --- TLS (issue 15) ---
    /// How an https:// station's certificate is verified.
    pub tls: AgentTls,
}

/// `ca_file` and `tls_pin`: allowed only with an https:// station.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentTls {
    /// Trust these CA certificates (PEM) instead of the system's: a
    /// company CA of an inspecting proxy, or the station's own CA.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the station certificate's SubjectPublicKeyInfo; when
    /// given, the certificate must also carry one of these keys.
    pub pins: Vec<[u8; 32]>,
}

/// The station's address, from `station = "http[s]://host[:port][/prefix/]"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StationUrl {
    /// `https://`: TLS to the station (through a proxy, inside CONNECT).
    pub https: bool,
    /// Host name or IP address; an IPv6 address is stored without brackets.
    pub host: String,
    /// TCP port; 80 (443 for https) when the URL names none.
    pub port: u16,
    /// Path every carrier request starts with; always begins and ends with
    /// `/`, e.g. `/` or `/tunnel/`, so request paths are `prefix + rest`.
    pub path_prefix: String,
}

impl StationUrl {
    /// The `Host` header value: `host`, or `host:port` when the port is not
    /// the scheme's default, with an IPv6 address in brackets.
    #[must_use]
    pub fn authority(&self) -> String {
        let host =
            if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let default = if self.https { HTTPS_DEFAULT_PORT } else { HTTP_DEFAULT_PORT };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// A forward proxy, from `proxy = "http://[user:pass@]host[:port]"` or the
/// environment.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Host name or IP address; an IPv6 address is stored without brackets.
    pub host: String,
    /// TCP port; 80 when the URL names none, as for any http:// URL.
    pub port: u16,
    /// User and password, percent-decoded, for `Proxy-Authorization: Basic`.
    pub auth: Option<(String, String)>,
}

impl ProxyUrl {
    /// The `Proxy-Authorization` header value (RFC 7617), if credentials
    /// were given.
    #[must_use]
    pub fn authorization(&self) -> Option<String> {
        self.auth
            .as_ref()
            .map(|(user, pass)| format!("Basic {}", STANDARD.encode(format!("{user}:{pass}"))))
    }
}

/// Hand-written so that `{:?}` of an [`AgentConfig`] in a log line does not
/// print the proxy password.
impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("auth", &self.auth.as_ref().map(|(user, _)| (user, "..")))
            .finish()
    }
}

/// Which HTTP carrier shape the agent uses (see the carrier module).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CarrierKind {
    /// Try stream; fall back to poll when the path buffers or cuts it.
    #[default]
    Auto,
    /// Long-lived chunked requests and responses only.
    Stream,
    /// Plain request/response with long-polling only.
    Poll,
}

/// One `[[forward]]` entry: a local byte source carried to a station target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Where the local bytes come from.
    pub source: ForwardSource,
    /// A name from the station's `[targets]`; only the station can check it.
    pub target: String,
}

/// The local end of a forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardSource {
    /// Accept TCP connections here; each is one stream to the target.
    Listen(SocketAddr),
    /// Open this serial line; it is one stream to the target.
    Serial(SerialConfig),
}

/// One `[services]` entry: what the station may open on this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Service {
    /// Connect to this "host:port" on the device's side.
    Tcp(String),
    /// Open this serial line.
    Serial(SerialConfig),
}

/// A serial line and its settings; defaults are 8N1 without flow control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialConfig {
    /// Device path, absolute, e.g. `/dev/ttyUSB0`.
    pub path: String,
    /// Line speed in bits per second; always given, never guessed.
    pub baud: u32,
    /// 5 to 8; default 8.
    pub data_bits: u8,
    /// Default none.
    pub parity: Parity,
    /// 1 or 2; default 1.
    pub stop_bits: u8,
    /// Default none.
    pub flow_control: FlowControl,
}

/// Serial parity bit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// No parity bit.
    #[default]
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// Serial flow control.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    /// No flow control.
    #[default]
    None,
    /// XON/XOFF in band.
    Software,
    /// RTS/CTS lines.
    Hardware,
}

/// Either kind of config, for `postern check`.
#[derive(Debug, Clone)]
pub enum AnyConfig {
    /// The file was a `station.toml`.
    Station(StationConfig),
    /// The file was an `agent.toml`.
    Agent(AgentConfig),
}

impl StationConfig {
    /// Read and check a station config file. Errors name the file as given.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_file(path, Self::parse_in)
    }

    /// Check config text; `file` names it in errors, and its directory is
    /// where a relative `private_key_file` is looked up.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        Self::parse_in(text, file, base_dir(Path::new(file)))
    }

    fn parse_in(text: &str, file: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawStation = parse_toml(text, file)?;
        check_station(raw, file, base)
    }
}

impl AgentConfig {
    /// Read and check an agent config file. Errors name the file as given.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_file(path, Self::parse_in)
    }

    /// Check config text; `file` names it in errors, and its directory is
    /// where a relative `private_key_file` is looked up.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        Self::parse_in(text, file, base_dir(Path::new(file)))
    }

    fn parse_in(text: &str, file: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawAgent = parse_toml(text, file)?;
        check_agent(raw, file, base)
    }
}

/// Load either kind of config: one with a top-level `station` key (the URL
/// an agent connects to) is an agent config, any other a station config.
pub fn load_any(path: &Path) -> Result<AnyConfig, ConfigError> {
    load_file(path, |text, file, base| {
        let table: toml::Table = parse_toml(text, file)?;
        if table.contains_key("station") {
            AgentConfig::parse_in(text, file, base).map(AnyConfig::Agent)
        } else {
            station_config(text, file, base)
        }
    })
}

#[cfg(feature = "station")]
fn station_config(text: &str, file: &str, base: &Path) -> Result<AnyConfig, ConfigError> {
    StationConfig::parse_in(text, file, base).map(AnyConfig::Station)
}

/// A device build has no station, and leaves out what reads its config
/// (15 KiB on armv7): a file without `station` is refused unread.
#[cfg(not(feature = "station"))]
fn station_config(_: &str, file: &str, _: &Path) -> Result<AnyConfig, ConfigError> {
    Err(ConfigError::new(
        file,
        "station",
        "missing, so this is not an agent config; this build has no station and does not \
         check station configs"
            .to_owned(),
    ))
}

/// Reads `path` and hands its text, its name for errors and its directory
/// (for a relative `private_key_file`) to `parse`.
fn load_file<T>(
    path: &Path,
    parse: impl FnOnce(&str, &str, &Path) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let file = path.display().to_string();
    let text = read_config(path, &file)?;
    parse(&text, &file, base_dir(path))
}

/// The forward proxy the environment asks for when reaching `station_host`:
/// `HTTP_PROXY`, else `http_proxy`, unless `NO_PROXY` (else `no_proxy`)
/// exempts the host. Errors report the variable as the field of the file
/// `environment`.
pub fn proxy_from_env(station_host: &str) -> Result<Option<ProxyUrl>, ConfigError> {
    proxy_from_vars(station_host, HTTP_PROXY_VARS, |name| std::env::var_os(name))
}

/// As [`proxy_from_env`], for `station`: an https:// station looks at
/// `HTTPS_PROXY`, else `https_proxy`, as curl and browsers do.
pub fn proxy_from_env_for(station: &StationUrl) -> Result<Option<ProxyUrl>, ConfigError> {
    let names = if station.https { HTTPS_PROXY_VARS } else { HTTP_PROXY_VARS };
    proxy_from_vars(&station.host, names, |name| std::env::var_os(name))
}

/// The proxy the agent uses: its config's `proxy`, else the environment's
/// ([`proxy_from_env_for`]). The agent and `postern check` both ask this,
/// so a config check calls OK is one the agent starts with.
pub fn agent_proxy(config: &AgentConfig) -> Result<Option<ProxyUrl>, ConfigError> {
    match &config.proxy {
        Some(proxy) => Ok(Some(proxy.clone())),
        None => proxy_from_env_for(&config.station),
    }
}

const HTTP_PROXY_VARS: &[&str] = &["HTTP_PROXY", "http_proxy"];
const HTTPS_PROXY_VARS: &[&str] = &["HTTPS_PROXY", "https_proxy"];

// ---------------------------------------------------------------------------
// Raw shapes: exactly the TOML, strings unparsed. Required fields are
// `Option` so that a missing one is reported with its name as the field.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStation {
    listen: Option<String>,
    private_key: Option<String>,
    private_key_file: Option<String>,
    next_private_key: Option<String>,
    next_private_key_file: Option<String>,
    status: Option<String>,
    session_timeout: Option<u64>,
    max_connections: Option<u64>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    #[serde(default)]
    targets: BTreeMap<String, String>,
    #[serde(default)]
    devices: Vec<RawDevice>,
    cluster: Option<RawCluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    store: Option<String>,
    peer: Option<String>,
    advertise: Option<String>,
    record_ttl: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: Option<String>,
    /// A string or a list of strings; told apart by [`key_list`].
    public_key: Option<toml::Value>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    expose: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    station: Option<String>,
    /// A string or a list of strings; told apart by [`key_list`].
    station_public_key: Option<toml::Value>,
    private_key: Option<String>,
    private_key_file: Option<String>,
    proxy: Option<String>,
    #[serde(default)]
    carrier: CarrierKind,
    session_timeout: Option<u64>,
    keepalive: Option<u64>,
    poll_hold: Option<u64>,
    stream_retry: Option<u64>,
    ca_file: Option<String>,
    #[serde(default)]
    tls_pin: Vec<String>,
    #[serde(default)]
    forward: Vec<RawForward>,
    /// Values are either a "host:port" string or a serial table; kept as
    /// TOML values and told apart by hand, because an untagged serde enum
    /// would report any mistake as "did not match any variant".
    #[serde(default)]
    services: BTreeMap<String, toml::Value>,
    status: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    listen: Option<String>,
    serial: Option<String>,
    baud: Option<u32>,
    data_bits: Option<u8>,
    parity: Option<Parity>,
    stop_bits: Option<u8>,
    flow_control: Option<FlowControl>,
    target: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSerialService {
    serial: String,
    baud: Option<u32>,
    data_bits: Option<u8>,
    parity: Option<Parity>,
    stop_bits: Option<u8>,
    flow_control: Option<FlowControl>,
}

/// The serial settings a forward or a service table may carry.
struct RawSerialSettings {
    baud: Option<u32>,
    data_bits: Option<u8>,
    parity: Option<Parity>,
    stop_bits: Option<u8>,
    flow_control: Option<FlowControl>,
}

// ---------------------------------------------------------------------------
// Reading.

/// Where a relative `private_key_file` is looked up: the config file's own
/// directory, so a config and its key can move together.
fn base_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

fn read_config(path: &Path, file: &str) -> Result<String, ConfigError> {
    read_bounded(path, MAX_CONFIG_BYTES).map_err(|reason| ConfigError::new(file, "", reason))
}

/// Read a small text file, refusing more than `max` bytes.
fn read_bounded(path: &Path, max: u64) -> Result<String, String> {
    let opened = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut text = String::new();
    opened.take(max + 1).read_to_string(&mut text).map_err(|e| format!("cannot read: {e}"))?;
    if text.len() as u64 > max {
        return Err(format!("larger than {max} bytes, too large for this file"));
    }
    Ok(text)
}

fn parse_toml<T: DeserializeOwned>(text: &str, file: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let reason = match e.span() {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                format!("line {line}, column {column}: {}", e.message())
            }
            None => e.message().to_owned(),
        };
        ConfigError::new(file, "", reason)
    })
}

/// 1-based line and column (in characters) of a byte offset, the way
/// editors count, so "line 4, column 1" can be jumped to.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |newline| newline + 1);
    let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    (line, column)
}

/// `FIELD = "BASE64"` or `FIELD_file = "PATH"`: exactly one of the two.
fn load_private_key(
    field: &str,
    inline: Option<String>,
    key_file: Option<String>,
    file: &str,
    base: &Path,
) -> Result<PrivateKey, ConfigError> {
    let file_field = format!("{field}_file");
    match (inline, key_file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            file,
            field,
            format!("both {field} and {file_field} are set; keep one"),
        )),
        (None, None) => Err(ConfigError::new(
            file,
            field,
            format!(
                "missing; set {field} = \"BASE64\" (from `postern genkey`) or {file_field} = \"PATH\""
            ),
        )),
        (Some(text), None) => PrivateKey::from_base64(&text)
            .map_err(|e| ConfigError::new(file, field, e.to_string())),
        (None, Some(key_path)) => {
            if key_path.is_empty() {
                return Err(ConfigError::new(file, file_field, "must not be empty"));
            }
            let full = base.join(&key_path);
            read_key_file(&full, file).map_err(|reason| {
                ConfigError::new(file, file_field, format!("{}: {reason}", full.display()))
            })
        }
    }
}

fn read_key_file(path: &Path, file: &str) -> Result<PrivateKey, String> {
    warn_if_key_file_open(path, file);
    let text = read_bounded(path, MAX_KEY_FILE_BYTES)?;
    PrivateKey::from_base64(&text).map_err(|e| e.to_string())
}

/// A private key others can read is a device others can impersonate. This
/// is a warning, not an error, because images are often built with loose
/// modes and a refusal would brick a device in the field.
#[cfg(unix)]
fn warn_if_key_file_open(path: &Path, file: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode();
        if key_mode_too_open(mode) {
            log::warn!(
                "{file}: private_key_file {} can be read by group or others (mode {:03o}); \
                 run chmod 600 {}",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_key_file_open(_path: &Path, _file: &str) {}

#[cfg(unix)]
fn key_mode_too_open(mode: u32) -> bool {
    mode & 0o077 != 0
}

// ---------------------------------------------------------------------------
// Station checks.

fn check_station(raw: RawStation, file: &str, base: &Path) -> Result<StationConfig, ConfigError> {
    let fail = |field: &str, reason: String| ConfigError::new(file, field, reason);

    let listen_text = raw
        .listen
        .ok_or_else(|| fail("listen", "missing; e.g. listen = \"0.0.0.0:8080\"".into()))?;
    let listen = socket_addr(&listen_text).map_err(|r| fail("listen", r))?;
    let private_key =
        load_private_key("private_key", raw.private_key, raw.private_key_file, file, base)?;
    let own_public = private_key.public_key();
    let next_private_key = match (&raw.next_private_key, &raw.next_private_key_file) {
        (None, None) => None,
        _ => Some(load_private_key(
            "next_private_key",
            raw.next_private_key,
            raw.next_private_key_file,
            file,
            base,
        )?),
    };
    if next_private_key.as_ref().is_some_and(|next| next.public_key() == own_public) {
        return Err(fail(
            "next_private_key",
            "is the same key as private_key; give the new key, or remove the line".into(),
        ));
    }
    let next_public = next_private_key.as_ref().map(PrivateKey::public_key);

    let session_timeout = session_timeout(raw.session_timeout, file)?;
    let status = match raw.status {
        Some(text) => Some(socket_addr(&text).map_err(|r| fail("status", r))?),
        None => None,
    };
    // Port 0 asks the system for a free port: never a clash.
    if status == Some(listen) && listen.port() != 0 {
        return Err(fail(
            "status",
            format!("{listen} is also the carrier listen address; give status its own port"),
        ));
    }

    for (name, address) in &raw.targets {
        let field = key_path("targets", name);
        check_name(name).map_err(|r| fail(&field, r))?;
        check_host_port(address).map_err(|r| fail(&field, r))?;
    }

    let mut devices = Vec::with_capacity(raw.devices.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut keys: HashMap<PublicKey, usize> = HashMap::new();
    let mut exposed: HashMap<SocketAddr, usize> = HashMap::new();
    for (index, raw_device) in raw.devices.into_iter().enumerate() {
        let at = format!("devices[{index}]");

        let name = raw_device.name.ok_or_else(|| fail(&format!("{at}.name"), "missing".into()))?;
        check_name(&name).map_err(|r| fail(&format!("{at}.name"), r))?;
        if let Some(first) = names.insert(name.clone(), index) {
            return Err(fail(
                &format!("{at}.name"),
                format!("{name:?} is also the name of devices[{first}]; names must be unique"),
            ));
        }

        let key_field = format!("{at}.public_key");
        let key_value = raw_device.public_key.ok_or_else(|| {
            fail(&key_field, "missing; the device prints it with `postern pubkey`".into())
        })?;
        let public_keys = key_list(&key_value).map_err(|r| fail(&key_field, r))?;
        for public_key in &public_keys {
            if *public_key == own_public || Some(*public_key) == next_public {
                return Err(fail(
                    &key_field,
                    "is one of the station's own public keys; give the device's key".into(),
                ));
            }
            match keys.insert(*public_key, index) {
                Some(first) if first == index => {
                    return Err(fail(&key_field, "lists the same key twice".into()))
                }
                Some(first) => {
                    return Err(fail(
                        &key_field,
                        format!("same key as devices[{first}]; each device needs its own key pair"),
                    ))
                }
                None => {}
            }
        }

        for allowed in &raw_device.allow {
            if !raw.targets.contains_key(allowed) {
                return Err(fail(
                    &format!("{at}.allow"),
                    format!("{allowed:?} is not in [targets]; {}", known_targets(&raw.targets)),
                ));
            }
        }

        let mut expose = BTreeMap::new();
        for (address_text, service) in raw_device.expose {
            let field = key_path(&format!("{at}.expose"), &address_text);
            let address = socket_addr(&address_text).map_err(|r| fail(&field, r))?;
            check_name(&service).map_err(|r| fail(&field, format!("service name {r}")))?;
            if address.port() != 0 && (address == listen || Some(address) == status) {
                return Err(fail(
                    &field,
                    format!("{address} is already the station's listen or status address"),
                ));
            }
            if let Some(first) = exposed.insert(address, index) {
                return Err(fail(
                    &field,
                    format!("{address} is already exposed by devices[{first}]; each listener serves one device"),
                ));
            }
            expose.insert(address, service);
        }

        devices.push(DeviceConfig { name, public_keys, allow: raw_device.allow, expose });
    }

    let tls = station_tls(raw.tls_cert_file, raw.tls_key_file, file, base)?;
    let cluster = match raw.cluster {
        Some(cluster) => Some(check_cluster(cluster, listen, status, file)?),
        None => None,
    };
    let max_connections = match raw.max_connections {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(n) if MAX_CONNECTIONS_RANGE.contains(&n) => n as usize,
        Some(n) => {
            return Err(fail(
                "max_connections",
                format!(
                    "{n} is out of range; give {} to {}",
                    MAX_CONNECTIONS_RANGE.start(),
                    MAX_CONNECTIONS_RANGE.end()
                ),
            ))
        }
    };
    Ok(StationConfig {
        listen,
        private_key,
        next_private_key,
        status,
        session_timeout,
        targets: raw.targets,
        devices,
        tls,
        max_connections,
        cluster,
    })
}

fn check_cluster(
    raw: RawCluster,
    listen: SocketAddr,
    status: Option<SocketAddr>,
    file: &str,
) -> Result<ClusterConfig, ConfigError> {
    let fail = |field: &str, reason: String| ConfigError::new(file, field, reason);
    let store = raw.store.ok_or_else(|| {
        fail("cluster.store", "missing; e.g. store = \"redis://10.0.0.2:6379\"".into())
    })?;
    let store = store_addr(&store).map_err(|r| fail("cluster.store", r))?;
    let peer = raw.peer.ok_or_else(|| {
        fail(
            "cluster.peer",
            "missing: the address the other stations reach this one at, e.g. \"10.0.0.5:7700\""
                .into(),
        )
    })?;
    let peer = socket_addr(&peer).map_err(|r| fail("cluster.peer", r))?;
    if peer.port() != 0 && (peer == listen || Some(peer) == status) {
        return Err(fail(
            "cluster.peer",
            format!("{peer} is already the station's listen or status address; give peers their own port"),
        ));
    }
    let advertise = match raw.advertise {
        Some(text) => {
            let addr = socket_addr(&text).map_err(|r| fail("cluster.advertise", r))?;
            if addr.ip().is_unspecified() || addr.port() == 0 {
                return Err(fail(
                    "cluster.advertise",
                    format!("{addr} is not an address another station can connect to"),
                ));
            }
            Some(addr)
        }
        None if peer.ip().is_unspecified() => {
            return Err(fail(
                "cluster.advertise",
                format!(
                    "missing: peer {peer} binds every address, so give the one the other \
                     stations reach this one at, e.g. advertise = \"10.0.0.5:{}\"",
                    peer.port()
                ),
            ))
        }
        None => None,
    };
    let record_ttl = whole_seconds(
        "cluster.record_ttl",
        raw.record_ttl,
        DEFAULT_RECORD_TTL,
        RECORD_TTL_RANGE,
        file,
    )?;
    Ok(ClusterConfig { store, peer, advertise, record_ttl })
}

/// `redis://[:password@]host:port[/db]`, or plain `host:port`.
fn store_addr(text: &str) -> Result<StoreAddr, String> {
    let usage = "expected redis://host:port, redis://:password@host:port/db or host:port";
    let rest = match text.split_once("://") {
        Some(("redis", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "{scheme}:// is not supported (TLS to the store is not built in); {usage}"
            ))
        }
        None => text,
    };
    let (password, rest) = match rest.rsplit_once('@') {
        Some((user_info, rest)) => {
            let password = user_info.strip_prefix(':').unwrap_or(user_info);
            if password.is_empty() {
                return Err(format!("an empty password in {text:?}; {usage}"));
            }
            (Some(password.to_owned()), rest)
        }
        None => (None, rest),
    };
    let (host_port, db) = match rest.split_once('/') {
        Some((host_port, "")) => (host_port, 0),
        Some((host_port, db)) => {
            let db = db.parse().map_err(|_| format!("database {db:?} is not a number; {usage}"))?;
            (host_port, db)
        }
        None => (rest, 0),
    };
    let port_ok = host_port
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err(format!("{host_port:?} has no host and port; {usage}"));
    }
    Ok(StoreAddr { host_port: host_port.to_owned(), password, db })
}

fn session_timeout(seconds: Option<u64>, file: &str) -> Result<Duration, ConfigError> {
    whole_seconds("session_timeout", seconds, DEFAULT_SESSION_TIMEOUT, SESSION_TIMEOUT_RANGE, file)
}

/// A setting `field` in whole seconds within `range`, or `default`.
fn whole_seconds(
    field: &str,
    seconds: Option<u64>,
    default: Duration,
    range: std::ops::RangeInclusive<u64>,
    file: &str,
) -> Result<Duration, ConfigError> {
    match seconds {
        None => Ok(default),
        Some(s) if range.contains(&s) => Ok(Duration::from_secs(s)),
        Some(s) => Err(ConfigError::new(
            file,
            field,
            format!("{s} is out of range; give seconds from {} to {}", range.start(), range.end()),
        )),
    }
}

/// A `public_key` field: one base64 key, or a list of 1 to [`MAX_KEYS`]
/// different keys (a key rotation in progress).
fn key_list(value: &toml::Value) -> Result<Vec<PublicKey>, String> {
    let one = |item: &toml::Value| match item {
        toml::Value::String(text) => PublicKey::from_base64(text).map_err(|e| e.to_string()),
        other => Err(format!("expected a base64 key in quotes, found {}", other.type_str())),
    };
    let keys = match value {
        toml::Value::Array(items) => items.iter().map(one).collect::<Result<Vec<_>, _>>()?,
        single => vec![one(single)?],
    };
    if keys.is_empty() {
        return Err("an empty list; give at least one key".into());
    }
    if keys.len() > MAX_KEYS {
        return Err(format!(
            "{} keys; at most {MAX_KEYS} (the current key and the next while one is replaced)",
            keys.len()
        ));
    }
    for (i, key) in keys.iter().enumerate() {
        if keys[..i].contains(key) {
            return Err("lists the same key twice".into());
        }
    }
    Ok(keys)
}

fn known_targets(targets: &BTreeMap<String, String>) -> String {
    if targets.is_empty() {
        "no [targets] are defined".to_owned()
    } else {
        let names: Vec<&str> = targets.keys().map(String::as_str).collect();
        format!("defined targets: {}", names.join(", "))
    }
}

// ---------------------------------------------------------------------------
// Agent checks.

fn check_agent(raw: RawAgent, file: &str, base: &Path) -> Result<AgentConfig, ConfigError> {
    let fail = |field: &str, reason: String| ConfigError::new(file, field, reason);

    let station_text = raw.station.ok_or_else(|| {
        fail("station", "missing; e.g. station = \"http://station.example.com/\"".into())
    })?;
    let station = parse_station_url(&station_text).map_err(|r| fail("station", r))?;

    let key_value = raw.station_public_key.ok_or_else(|| {
        fail(
            "station_public_key",
            "missing; the station's operator prints it with `postern pubkey`".into(),
        )
    })?;
    let station_public_keys = key_list(&key_value).map_err(|r| fail("station_public_key", r))?;
    let private_key =
        load_private_key("private_key", raw.private_key, raw.private_key_file, file, base)?;
    if station_public_keys.contains(&private_key.public_key()) {
        return Err(fail(
            "station_public_key",
            "is this agent's own public key; give the station's".into(),
        ));
    }

    let proxy = match raw.proxy {
        Some(text) if text.trim().is_empty() => {
            return Err(fail(
                "proxy",
                "empty; remove the line to use HTTP_PROXY, or list the station in NO_PROXY to go direct"
                    .into(),
            ))
        }
        Some(text) => Some(parse_proxy_url(&text).map_err(|r| fail("proxy", r))?),
        None => None,
    };

    // Two users of one serial line would each see half its bytes.
    let mut serial_users: HashMap<String, String> = HashMap::new();
    let mut claim_serial = |serial: &SerialConfig, field: &str| match serial_users
        .insert(serial.path.clone(), field.to_owned())
    {
        Some(first) => Err(fail(field, format!("{} is already used by {first}", serial.path))),
        None => Ok(()),
    };

    let mut forwards = Vec::with_capacity(raw.forward.len());
    let mut listeners: HashMap<SocketAddr, usize> = HashMap::new();
    for (index, raw_forward) in raw.forward.into_iter().enumerate() {
        let at = format!("forward[{index}]");
        let settings = RawSerialSettings {
            baud: raw_forward.baud,
            data_bits: raw_forward.data_bits,
            parity: raw_forward.parity,
            stop_bits: raw_forward.stop_bits,
            flow_control: raw_forward.flow_control,
        };
        let source = match (raw_forward.listen, raw_forward.serial) {
            (Some(_), Some(_)) => {
                return Err(fail(
                    &at,
                    "has both listen and serial; a forward has one source".into(),
                ))
            }
            (None, None) => {
                return Err(fail(&at, "needs listen = \"IP:PORT\" or serial = \"/dev/...\"".into()))
            }
            (Some(text), None) => {
                if let Some(name) = settings.first_present() {
                    return Err(fail(
                        &format!("{at}.{name}"),
                        "applies only to a serial forward, and this one has listen".into(),
                    ));
                }
                let field = format!("{at}.listen");
                let address = socket_addr(&text).map_err(|r| fail(&field, r))?;
                // Port 0 asks the system for a free port: never a clash.
                let clash =
                    if address.port() == 0 { None } else { listeners.insert(address, index) };
                if let Some(first) = clash {
                    return Err(fail(&field, format!("{address} is also forward[{first}].listen")));
                }
                ForwardSource::Listen(address)
            }
            (None, Some(path)) => {
                let serial = serial_config(path, settings, &at, file)?;
                claim_serial(&serial, &format!("{at}.serial"))?;
                ForwardSource::Serial(serial)
            }
        };

        let field = format!("{at}.target");
        let target = raw_forward
            .target
            .ok_or_else(|| fail(&field, "missing; name one of the station's [targets]".into()))?;
        check_name(&target).map_err(|r| fail(&field, r))?;
        forwards.push(Forward { source, target });
    }

    let mut services = BTreeMap::new();
    for (name, value) in raw.services {
        let field = key_path("services", &name);
        check_name(&name).map_err(|r| fail(&field, format!("service name {r}")))?;
        let service = match value {
            toml::Value::String(address) => {
                check_host_port(&address).map_err(|r| fail(&field, r))?;
                Service::Tcp(address)
            }
            table @ toml::Value::Table(_) => {
                let raw_serial: RawSerialService = table
                    .try_into()
                    .map_err(|e: toml::de::Error| fail(&field, e.message().to_owned()))?;
                let settings = RawSerialSettings {
                    baud: raw_serial.baud,
                    data_bits: raw_serial.data_bits,
                    parity: raw_serial.parity,
                    stop_bits: raw_serial.stop_bits,
                    flow_control: raw_serial.flow_control,
                };
                let serial = serial_config(raw_serial.serial, settings, &field, file)?;
                claim_serial(&serial, &format!("{field}.serial"))?;
                Service::Serial(serial)
            }
            other => {
                return Err(fail(
                    &field,
                    format!(
                        "expected \"HOST:PORT\" or {{ serial = \"/dev/...\", baud = N }}, found {}",
                        other.type_str()
                    ),
                ))
            }
        };
        services.insert(name, service);
    }

    let status = match raw.status {
        Some(text) => {
            let address = socket_addr(&text).map_err(|r| fail("status", r))?;
            let clash = listeners.get(&address).filter(|_| address.port() != 0);
            if let Some(index) = clash {
                return Err(fail("status", format!("{address} is also forward[{index}].listen")));
            }
            Some(address)
        }
        None => None,
    };

    let tls = agent_tls(&station, raw.ca_file, &raw.tls_pin, file, base)?;
    let session_timeout = session_timeout(raw.session_timeout, file)?;
    // Unset, each is its default or a third of session_timeout if that is
    // shorter, so a short session_timeout alone still makes a live session.
    // Both within the range a station follows.
    let third = (session_timeout / 3).max(Duration::from_secs(1));
    let range = crate::carrier::KEEPALIVE_RANGE;
    let keepalive = whole_seconds(
        "keepalive",
        raw.keepalive,
        DEFAULT_KEEPALIVE.min(third),
        range.clone(),
        file,
    )?;
    let poll_hold = whole_seconds(
        "poll_hold",
        raw.poll_hold,
        crate::carrier::poll::POLL_WAIT.min(third),
        range,
        file,
    )?;
    let stream_retry = whole_seconds(
        "stream_retry",
        raw.stream_retry,
        crate::carrier::auto::STREAM_RETRY,
        1..=86_400,
        file,
    )?;
    // The session must outlive two silent intervals: one late keepalive
    // (or held poll) must not end it.
    for (field, interval) in [("keepalive", keepalive), ("poll_hold", poll_hold)] {
        if session_timeout < interval * 2 {
            return Err(ConfigError::new(
                file,
                field,
                format!(
                    "{} s leaves session_timeout ({} s) less than two of them; raise session_timeout to at least {} or shorten {field}",
                    interval.as_secs(),
                    session_timeout.as_secs(),
                    interval.as_secs() * 2
                ),
            ));
        }
    }
    Ok(AgentConfig {
        station,
        station_public_keys,
        private_key,
        proxy,
        carrier: raw.carrier,
        session_timeout,
        keepalive,
        poll_hold,
        stream_retry,
        forwards,
        services,
        status,
        tls,
    })
}

impl RawSerialSettings {
    /// The first serial-only setting present, to reject it on a TCP forward.
    fn first_present(&self) -> Option<&'static str> {
        [
            ("baud", self.baud.is_some()),
            ("data_bits", self.data_bits.is_some()),
            ("parity", self.parity.is_some()),
            ("stop_bits", self.stop_bits.is_some()),
            ("flow_control", self.flow_control.is_some()),
        ]
        .into_iter()
        .find_map(|(name, present)| present.then_some(name))
    }
}

fn serial_config(
    path: String,
    settings: RawSerialSettings,
    at: &str,
    file: &str,
) -> Result<SerialConfig, ConfigError> {
    let fail = |name: &str, reason: &str| ConfigError::new(file, format!("{at}.{name}"), reason);

    // systemd starts services in `/`, so a relative path would not mean
    // what it meant in the operator's shell.
    if !Path::new(&path).is_absolute() {
        return Err(fail("serial", "must be an absolute device path such as /dev/ttyUSB0"));
    }
    let baud = match settings.baud {
        None => {
            return Err(fail("baud", "missing; a serial line needs its speed, e.g. baud = 115200"))
        }
        Some(0) => return Err(fail("baud", "must be greater than 0")),
        Some(baud) => baud,
    };
    let data_bits = settings.data_bits.unwrap_or(8);
    if !(5..=8).contains(&data_bits) {
        return Err(fail("data_bits", "must be 5, 6, 7 or 8"));
    }
    let stop_bits = settings.stop_bits.unwrap_or(1);
    if stop_bits != 1 && stop_bits != 2 {
        return Err(fail("stop_bits", "must be 1 or 2"));
    }
    Ok(SerialConfig {
        path,
        baud,
        data_bits,
        parity: settings.parity.unwrap_or_default(),
        stop_bits,
        flow_control: settings.flow_control.unwrap_or_default(),
    })
}

// ---------------------------------------------------------------------------
// Field-level parsers. They return the reason only; callers add file/field.

fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "unparseable address {text:?}, expected IP:PORT such as 127.0.0.1:5020 \
             (host names are not resolved here)"
        )
    })
}

/// A device, target or service name: printable and short.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("{name:?} is longer than {MAX_NAME_BYTES} bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{name:?} contains a control character"));
    }
    Ok(())
}

/// A "host:port" to connect to later: `10.0.0.5:502`, `db.local:5432`,
/// `[fd00::5]:502`.
fn check_host_port(text: &str) -> Result<(), String> {
    match split_host_port(text, None) {
        Ok(_) => Ok(()),
        Err(reason) => Err(format!("{text:?}: {reason}")),
    }
}

/// Split an authority into an unbracketed host and a port. Without a
/// `default_port` the port is required.
fn split_host_port(authority: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let (host, port_text) = if let Some(rest) = authority.strip_prefix('[') {
        let (inner, after) =
            rest.split_once(']').ok_or_else(|| "'[' without a closing ']'".to_owned())?;
        if inner.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{inner:?} in brackets is not an IPv6 address"));
        }
        match after {
            "" => (inner, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (inner, Some(port)),
                None => return Err(format!("unexpected {after:?} after ']'")),
            },
        }
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if host.contains(':') {
            return Err("an IPv6 address needs brackets, e.g. [fd00::5]:502".to_owned());
        }
        check_host(host)?;
        (host, port)
    };
    let port = match (port_text, default_port) {
        // RFC 3986 allows "host:" to mean the default port.
        (None | Some(""), Some(default)) => default,
        (None | Some(""), None) => return Err("no port; expected HOST:PORT".to_owned()),
        (Some(text), _) => parse_port(text)?,
    };
    Ok((host.to_owned(), port))
}

fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("empty host".to_owned());
    }
    if !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
        return Err(format!(
            "host {host:?} has a character not allowed in a host name or IPv4 address"
        ));
    }
    Ok(())
}

fn parse_port(text: &str) -> Result<u16, String> {
    let bad = || format!("port {text:?} is not a number from 1 to 65535");
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(port) => Ok(port),
    }
}

/// The pieces of an `http://` URL that both the station and proxy URLs use.
struct HttpUrl<'a> {
    https: bool,
    userinfo: Option<&'a str>,
    host: String,
    port: u16,
    /// Everything from the first `/` after the authority; may be empty.
    path: &'a str,
}

/// `https_advice`: why https is refused, or `None` when it is accepted.
fn split_http_url<'a>(text: &'a str, https_advice: Option<&str>) -> Result<HttpUrl<'a>, String> {
    let text = text.trim();
    let (scheme, rest) = text
        .split_once("://")
        .ok_or_else(|| format!("{text:?} is not a URL; expected http://HOST[:PORT]/"))?;
    let https = scheme.eq_ignore_ascii_case("https");
    if let (true, Some(advice)) = (https, https_advice) {
        return Err(format!("https is not supported; {advice}"));
    }
    if !https && !scheme.eq_ignore_ascii_case("http") {
        return Err(format!("scheme {scheme:?} is not supported; only http:// URLs are"));
    }
    if rest.contains('#') {
        return Err("a fragment (#...) has no meaning here; remove it".to_owned());
    }
    if rest.contains('?') {
        return Err("a query (?...) is not supported; remove it".to_owned());
    }
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (Some(userinfo), host_port),
        None => (None, authority),
    };
    let default_port = if https { HTTPS_DEFAULT_PORT } else { HTTP_DEFAULT_PORT };
    let (host, port) = split_host_port(host_port, Some(default_port))?;
    Ok(HttpUrl { https, userinfo, host, port, path })
}

fn parse_station_url(text: &str) -> Result<StationUrl, String> {
    let url = split_http_url(text, STATION_HTTPS_ADVICE)?;
    if url.userinfo.is_some() {
        return Err(
            "user:password@ is not used; the station knows the device by its key, remove it"
                .to_owned(),
        );
    }
    let path = if url.path.is_empty() { "/" } else { url.path };
    if let Some(bad) = path.chars().find(|&c| !is_path_char(c)) {
        return Err(format!(
            "path {path:?} contains {bad:?}; percent-encode it or choose another prefix"
        ));
    }
    check_percent_escapes(path)?;
    let path_prefix = if path.ends_with('/') { path.to_owned() } else { format!("{path}/") };
    Ok(StationUrl { https: url.https, host: url.host, port: url.port, path_prefix })
}

fn parse_proxy_url(text: &str) -> Result<ProxyUrl, String> {
    let url = split_http_url(
        text,
        Some("postern talks plain HTTP to the proxy (CONNECT for an https:// station); give the proxy's http:// address"),
    )?;
    if !url.path.is_empty() && url.path != "/" {
        return Err(format!("a proxy URL has no path, but this one has {:?}", url.path));
    }
    let auth = match url.userinfo {
        None => None,
        Some(userinfo) => {
            let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let user = percent_decode(user).map_err(|r| format!("user name: {r}"))?;
            let pass = percent_decode(pass).map_err(|r| format!("password: {r}"))?;
            if user.is_empty() {
                return Err("empty user name before '@'".to_owned());
            }
            // RFC 7617: Basic credentials cannot carry a colon in the user-id.
            if user.contains(':') {
                return Err("the user name cannot contain ':' (RFC 7617)".to_owned());
            }
            Some((user, pass))
        }
    };
    Ok(ProxyUrl { host: url.host, port: url.port, auth })
}

/// RFC 3986 `pchar` plus `/`: what a path may hold unencoded.
fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '-' | '.'
                | '_'
                | '~'
                | '!'
                | '$'
                | '&'
                | '\''
                | '('
                | ')'
                | '*'
                | '+'
                | ','
                | ';'
                | '='
                | ':'
                | '@'
                | '/'
                | '%'
        )
}

fn check_percent_escapes(text: &str) -> Result<(), String> {
    percent_decode_bytes(text).map(|_| ())
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = percent_decode_bytes(text)?;
    String::from_utf8(bytes).map_err(|_| "not UTF-8 after percent-decoding".to_owned())
}

fn percent_decode_bytes(text: &str) -> Result<Vec<u8>, String> {
    let bad = || format!("{text:?} has '%' not followed by two hex digits");
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = bytes.get(index + 1..index + 3).ok_or_else(bad)?;
            // Checked by hand because from_str_radix would accept "+1".
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(bad());
            }
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            let byte = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
            out.push(byte);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    Ok(out)
}

/// `prefix.key`, quoting the key as TOML would when it is not bare.
fn key_path(prefix: &str, key: &str) -> String {
    let bare =
        !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        format!("{prefix}.{key}")
    } else {
        format!("{prefix}.{key:?}")
    }
}

// ---------------------------------------------------------------------------
// TLS (issue 15): https:// stations, ca_file and tls_pin in the agent,
// tls_cert_file and tls_key_file in the station.

/// Why an https:// station URL is refused, or `None` when this build has TLS.
#[cfg(feature = "tls")]
const STATION_HTTPS_ADVICE: Option<&str> = None;
#[cfg(not(feature = "tls"))]
const STATION_HTTPS_ADVICE: Option<&str> = Some(
    "this postern was built without TLS (cargo feature `tls`, a board profile's choice); \
     use a build with it, or http:// with a TLS-terminating proxy in front of the station",
);

/// A path from the config, relative to the config file's directory.
fn config_path(text: &str, base: &Path) -> PathBuf {
    let path = Path::new(text);
    if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    }
}

fn agent_tls(
    station: &StationUrl,
    ca_file: Option<String>,
    pins: &[String],
    file: &str,
    base: &Path,
) -> Result<AgentTls, ConfigError> {
    let fail = |field: &str, reason: String| ConfigError::new(file, field, reason);
    if !station.https {
        let only = |field: &str| {
            fail(field, "applies only to an https:// station; the station URL is http://".into())
        };
        if ca_file.is_some() {
            return Err(only("ca_file"));
        }
        if !pins.is_empty() {
            return Err(only("tls_pin"));
        }
        return Ok(AgentTls::default());
    }
    let ca_file = ca_file.map(|text| config_path(&text, base));
    let mut parsed = Vec::with_capacity(pins.len());
    for (index, pin) in pins.iter().enumerate() {
        parsed.push(parse_pin(pin).map_err(|r| fail(&format!("tls_pin[{index}]"), r))?);
    }
    // Load what the agent will load, so `check` finds a bad ca_file or a
    // system without CA certificates now rather than at the first connect.
    #[cfg(feature = "tls")]
    crate::carrier::tls::ClientTls::new(ca_file.as_deref(), &parsed)
        .map_err(|e| fail(if ca_file.is_some() { "ca_file" } else { "station" }, e.to_string()))?;
    Ok(AgentTls { ca_file, pins: parsed })
}

/// A `tls_pin`: base64 of a SHA-256, optionally after `sha256/` or
/// `sha256//` (curl's `--pinnedpubkey` form).
fn parse_pin(text: &str) -> Result<[u8; 32], String> {
    let bare = text.trim();
    let bare =
        bare.strip_prefix("sha256//").or_else(|| bare.strip_prefix("sha256/")).unwrap_or(bare);
    let bytes = STANDARD.decode(bare).map_err(|e| {
        format!("{text:?} is not base64 ({e}); give the SHA-256 of the certificate's public key (docs/TLS.md)")
    })?;
    bytes
        .try_into()
        .map_err(|bytes: Vec<u8>| format!("{text:?} is {} bytes, a SHA-256 is 32", bytes.len()))
}

fn station_tls(
    cert: Option<String>,
    key: Option<String>,
    file: &str,
    base: &Path,
) -> Result<Option<TlsFiles>, ConfigError> {
    let fail = |field: &str, reason: &str| ConfigError::new(file, field, reason);
    let files = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(fail("tls_key_file", "missing; tls_cert_file needs it")),
        (None, Some(_)) => return Err(fail("tls_cert_file", "missing; tls_key_file needs it")),
        (Some(cert), Some(key)) => {
            TlsFiles { cert_file: config_path(&cert, base), key_file: config_path(&key, base) }
        }
    };
    // A build without the station cannot run this config anyway.
    #[cfg(all(feature = "tls", feature = "station"))]
    crate::carrier::tls::ServerTls::load(&files.cert_file, &files.key_file)
        .map_err(|e| fail("tls_cert_file", &e.to_string()))?;
    #[cfg(feature = "tls")]
    {
        Ok(Some(files))
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = files;
        Err(fail(
            "tls_cert_file",
            "this postern was built without TLS (cargo feature `tls`); terminate TLS in front of it",
        ))
    }
}

// ---------------------------------------------------------------------------
// Environment.

fn proxy_from_vars(
    station_host: &str,
    names: &[&'static str],
    var: impl Fn(&str) -> Option<OsString>,
) -> Result<Option<ProxyUrl>, ConfigError> {
    let Some((name, value)) = first_set(&var, names)? else {
        return Ok(None);
    };
    if let Some((no_proxy_name, list)) = first_set(&var, &["NO_PROXY", "no_proxy"])? {
        if no_proxy_matches(&list, station_host) {
            log::debug!("{no_proxy_name} exempts {station_host}; not using {name}");
            return Ok(None);
        }
    }
    // curl and most tools accept "proxy:3128" without a scheme; so do we.
    let url = if value.contains("://") { value } else { format!("http://{value}") };
    parse_proxy_url(&url).map(Some).map_err(|reason| ConfigError::new(ENVIRONMENT, name, reason))
}

/// The first of `names` that is set and not empty (an empty variable is the
/// usual way to switch a proxy off for one command).
fn first_set(
    var: &impl Fn(&str) -> Option<OsString>,
    names: &[&'static str],
) -> Result<Option<(&'static str, String)>, ConfigError> {
    for &name in names {
        if let Some(value) = var(name) {
            if value.is_empty() {
                continue;
            }
            let value = value
                .into_string()
                .map_err(|_| ConfigError::new(ENVIRONMENT, name, "not valid UTF-8"))?;
            return Ok(Some((name, value)));
        }
    }
    Ok(None)
}

/// Whether a NO_PROXY list exempts `host`: `*` matches everything; a name
/// matches itself and its subdomains (a leading dot changes nothing); an IP
/// address matches only the same address.
fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host_ip = host.parse::<IpAddr>().ok();
    list.split(',').map(str::trim).any(|entry| {
        if entry == "*" {
            return true;
        }
        let entry = entry.strip_prefix('.').unwrap_or(entry);
        if entry.is_empty() {
            return false;
        }
        let unbracketed =
            entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')).unwrap_or(entry);
        match (host_ip, unbracketed.parse::<IpAddr>().ok()) {
            (Some(host_ip), Some(entry_ip)) => host_ip == entry_ip,
            (None, None) => {
                let host = host.to_ascii_lowercase();
                let entry = entry.to_ascii_lowercase();
                host == entry || host.ends_with(&format!(".{entry}"))
            }
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Keys {
        station: PrivateKey,
        device: PrivateKey,
    }

    fn keys() -> Keys {
        Keys { station: PrivateKey::generate(), device: PrivateKey::generate() }
    }

    fn station_example(k: &Keys) -> String {
        format!(
            r#"
listen = "0.0.0.0:8080"
private_key = "{}"
status = "127.0.0.1:9090"

[targets]
collector = "10.0.0.5:502"

[[devices]]
name = "pump-17"
public_key = "{}"
allow = ["collector"]
[devices.expose]
"127.0.0.1:15020" = "modbus"
"#,
            k.station.to_base64(),
            k.device.public_key().to_base64()
        )
    }

    fn agent_example(k: &Keys) -> String {
        format!(
            r#"
station = "http://station.example.com/"
station_public_key = "{}"
private_key = "{}"
proxy = "http://user:pass@proxy:3128"
carrier = "auto"

[[forward]]
listen = "127.0.0.1:5020"
target = "collector"

[[forward]]
serial = "/dev/ttyS1"
baud = 115200
target = "collector"

[services]
modbus = "127.0.0.1:502"
console = {{ serial = "/dev/ttyUSB0", baud = 115200 }}
"#,
            k.station.public_key().to_base64(),
            k.device.to_base64()
        )
    }

    /// A station config with one device and extra text appended, so each
    /// test states only what it breaks.
    fn station_with(k: &Keys, extra: &str) -> Result<StationConfig, ConfigError> {
        StationConfig::parse(&format!("{}{extra}", station_example(k)), "station.toml")
    }

    fn station_err(text: &str) -> ConfigError {
        StationConfig::parse(text, "station.toml").expect_err("config should be rejected")
    }

    fn agent_err(text: &str) -> ConfigError {
        AgentConfig::parse(text, "agent.toml").expect_err("config should be rejected")
    }

    /// The top of an agent config with valid keys; tests add the rest.
    fn agent_head(k: &Keys, station: &str) -> String {
        format!(
            "station = {station:?}\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n",
            k.station.public_key().to_base64(),
            k.device.to_base64()
        )
    }

    fn assert_err(err: &ConfigError, field: &str, reason_part: &str) {
        assert_eq!(err.field, field, "wrong field in {err}");
        assert!(err.reason.contains(reason_part), "reason of {err:?} lacks {reason_part:?}");
    }

    /// A scratch directory unique to one test, removed when dropped.
    struct ScratchDir(std::path::PathBuf);

    impl ScratchDir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("postern-config-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("scratch dir");
            ScratchDir(dir)
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    // --- happy paths -------------------------------------------------------

    #[test]
    fn station_design_example() {
        let k = keys();
        let config =
            StationConfig::parse(&station_example(&k), "station.toml").expect("example is valid");
        assert_eq!(config.listen, "0.0.0.0:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(config.private_key.as_bytes(), k.station.as_bytes());
        assert_eq!(config.status, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(
            config.targets,
            BTreeMap::from([("collector".to_owned(), "10.0.0.5:502".to_owned())])
        );
        assert_eq!(
            config.devices,
            vec![DeviceConfig {
                name: "pump-17".to_owned(),
                public_keys: vec![k.device.public_key()],
                allow: vec!["collector".to_owned()],
                expose: BTreeMap::from([("127.0.0.1:15020".parse().unwrap(), "modbus".to_owned())]),
            }]
        );
    }

    #[test]
    fn agent_design_example() {
        let k = keys();
        let config = AgentConfig::parse(&agent_example(&k), "agent.toml").expect("valid");
        assert_eq!(
            config.station,
            StationUrl {
                https: false,
                host: "station.example.com".to_owned(),
                port: 80,
                path_prefix: "/".to_owned()
            }
        );
        assert_eq!(config.station.authority(), "station.example.com");
        assert_eq!(config.station_public_keys, vec![k.station.public_key()]);
        assert_eq!(config.private_key.as_bytes(), k.device.as_bytes());
        assert_eq!(
            config.proxy,
            Some(ProxyUrl {
                host: "proxy".to_owned(),
                port: 3128,
                auth: Some(("user".to_owned(), "pass".to_owned())),
            })
        );
        assert_eq!(config.carrier, CarrierKind::Auto);
        let serial_8n1 = |path: &str| SerialConfig {
            path: path.to_owned(),
            baud: 115_200,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
            flow_control: FlowControl::None,
        };
        assert_eq!(
            config.forwards,
            vec![
                Forward {
                    source: ForwardSource::Listen("127.0.0.1:5020".parse().unwrap()),
                    target: "collector".to_owned()
                },
                Forward {
                    source: ForwardSource::Serial(serial_8n1("/dev/ttyS1")),
                    target: "collector".to_owned()
                },
            ]
        );
        assert_eq!(
            config.services,
            BTreeMap::from([
                ("modbus".to_owned(), Service::Tcp("127.0.0.1:502".to_owned())),
                ("console".to_owned(), Service::Serial(serial_8n1("/dev/ttyUSB0"))),
            ])
        );
    }

    #[test]
    fn session_timeout_default_given_and_bounded() {
        let k = keys();
        let station = StationConfig::parse(&station_example(&k), "s.toml").unwrap();
        assert_eq!(station.session_timeout, DEFAULT_SESSION_TIMEOUT);
        let head = agent_head(&k, "http://st/");
        let agent = AgentConfig::parse(&format!("{head}session_timeout = 60\n"), "a.toml").unwrap();
        assert_eq!(agent.session_timeout, Duration::from_secs(60));
        for bad in ["5", "100000"] {
            let err = agent_err(&format!("{head}session_timeout = {bad}\n"));
            assert_eq!(
                err.to_string(),
                format!("agent.toml: session_timeout: {bad} is out of range; give seconds from 10 to 86400")
            );
        }
        let err = agent_err(&format!("{head}session_timeout = \"5m\"\n"));
        assert!(err.reason.contains("line 4"), "{err}");
    }

    #[test]
    fn keepalive_and_poll_hold_default_given_and_checked_against_session_timeout() {
        let k = keys();
        let head = agent_head(&k, "http://st/");
        let agent = AgentConfig::parse(&head, "a.toml").unwrap();
        assert_eq!(
            (agent.keepalive, agent.poll_hold),
            (DEFAULT_KEEPALIVE, crate::carrier::poll::POLL_WAIT)
        );
        // A short session_timeout alone shortens the defaults with it.
        let agent = AgentConfig::parse(&format!("{head}session_timeout = 12\n"), "a.toml").unwrap();
        assert_eq!(
            (agent.keepalive, agent.poll_hold),
            (Duration::from_secs(4), Duration::from_secs(4))
        );
        // A metered link: five-minute keepalives and holds.
        let metered = format!("{head}session_timeout = 900\nkeepalive = 300\npoll_hold = 300\n");
        let agent = AgentConfig::parse(&metered, "a.toml").unwrap();
        assert_eq!(
            (agent.keepalive, agent.poll_hold),
            (Duration::from_secs(300), Duration::from_secs(300))
        );
        assert_eq!(
            agent_err(&format!("{head}keepalive = 300\n")).to_string(),
            "agent.toml: keepalive: 300 s leaves session_timeout (300 s) less than two of them; \
             raise session_timeout to at least 600 or shorten keepalive"
        );
        assert_eq!(
            agent_err(&format!("{head}poll_hold = 0\n")).to_string(),
            "agent.toml: poll_hold: 0 is out of range; give seconds from 1 to 3600"
        );
    }

    #[test]
    fn stream_retry_defaults_and_is_checked() {
        let k = keys();
        let head = agent_head(&k, "http://10.1.2.3:8080/");
        let agent = AgentConfig::parse(&head, "a.toml").unwrap();
        assert_eq!(agent.stream_retry, crate::carrier::auto::STREAM_RETRY);
        let agent = AgentConfig::parse(&format!("{head}stream_retry = 2\n"), "a.toml").unwrap();
        assert_eq!(agent.stream_retry, Duration::from_secs(2));
        assert_eq!(
            agent_err(&format!("{head}stream_retry = 86401\n")).to_string(),
            "agent.toml: stream_retry: 86401 is out of range; give seconds from 1 to 86400"
        );
    }

    #[test]
    fn agent_minimal_defaults() {
        let k = keys();
        let config = AgentConfig::parse(&agent_head(&k, "http://10.1.2.3:8080/tunnel"), "a.toml")
            .expect("valid");
        assert_eq!(config.station.port, 8080);
        assert_eq!(config.station.path_prefix, "/tunnel/");
        assert_eq!(config.station.authority(), "10.1.2.3:8080");
        assert_eq!(config.proxy, None);
        assert_eq!(config.carrier, CarrierKind::Auto);
        assert!(config.forwards.is_empty());
        assert!(config.services.is_empty());
    }

    // --- TLS (issue 15) ----------------------------------------------------

    #[cfg(feature = "tls")]
    #[test]
    fn https_station_urls_default_to_443() {
        let url = parse_station_url("https://h/t").expect("valid");
        assert_eq!((url.https, url.port, url.authority()), (true, 443, "h".to_owned()));
        let url = parse_station_url("HTTPS://h:8443/").expect("valid");
        assert_eq!(url.authority(), "h:8443");
        // 443 is not the default of http://.
        assert_eq!(parse_station_url("http://h:443/").expect("valid").authority(), "h:443");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn agent_tls_settings() {
        let k = keys();
        let pin = STANDARD.encode([7u8; 32]);
        let text =
            format!("{}tls_pin = [\"sha256//{pin}\", \"{pin}\"]\n", agent_head(&k, "https://s/"));
        let config = AgentConfig::parse(&text, "agent.toml").expect("valid");
        assert_eq!(config.tls.pins, vec![[7u8; 32]; 2]);
        assert_eq!(config.tls.ca_file, None);
        for (extra, field, reason) in [
            ("tls_pin = [\"nope!\"]\n", "tls_pin[0]", "is not base64"),
            ("ca_file = \"/nonexistent/ca.pem\"\n", "ca_file", "cannot read /nonexistent/ca.pem"),
        ] {
            let err = agent_err(&format!("{}{extra}", agent_head(&k, "https://s/")));
            assert_err(&err, field, reason);
        }
        let err = agent_err(&format!("{}tls_pin = [\"{pin}\"]\n", agent_head(&k, "http://s/")));
        assert_err(&err, "tls_pin", "applies only to an https:// station");
    }

    #[test]
    fn cluster_table() {
        let k = keys();
        let with = |table: &str| format!("{}\n[cluster]\n{table}", station_example(&k));
        let parse = |table: &str| StationConfig::parse(&with(table), "station.toml");
        let cluster =
            parse("store = \"redis://:s3cret@10.0.0.2:6380/2\"\npeer = \"10.0.0.5:7700\"\n")
                .expect("valid")
                .cluster
                .expect("a cluster");
        assert_eq!(cluster.store.host_port, "10.0.0.2:6380");
        assert_eq!(cluster.store.password.as_deref(), Some("s3cret"));
        assert_eq!(cluster.store.db, 2);
        assert_eq!(cluster.record_ttl, DEFAULT_RECORD_TTL);
        assert_eq!(cluster.advertised("10.0.0.5:7700".parse().expect("addr")).port(), 7700);
        // The password is never printed.
        assert_eq!(format!("{:?}", cluster.store), "redis://10.0.0.2:6380/2");
        let plain = parse("store = \"redis.internal:6379\"\npeer = \"0.0.0.0:7700\"\nadvertise = \"10.0.0.5:7700\"\nrecord_ttl = 10\n")
            .expect("valid")
            .cluster
            .expect("a cluster");
        assert_eq!((plain.store.password.as_deref(), plain.store.db), (None, 0));
        assert_eq!(plain.record_ttl, Duration::from_secs(10));
        assert_eq!(
            plain.advertised("0.0.0.0:7700".parse().expect("addr")),
            "10.0.0.5:7700".parse().expect("addr")
        );
        assert!(station_with(&k, "").expect("valid").cluster.is_none());

        let peer = "peer = \"10.0.0.5:7700\"\n";
        assert_err(&parse(peer).expect_err("no store"), "cluster.store", "missing");
        let err = parse(&format!("store = \"rediss://h:1\"\n{peer}")).expect_err("tls");
        assert_err(&err, "cluster.store", "rediss:// is not supported");
        let err = parse(&format!("store = \"redis://h\"\n{peer}")).expect_err("no port");
        assert_err(&err, "cluster.store", "has no host and port");
        let err = parse(&format!("store = \"redis://h:1/x\"\n{peer}")).expect_err("db");
        assert_err(&err, "cluster.store", "database \"x\" is not a number");
        let store = "store = \"h:6379\"\n";
        assert_err(&parse(store).expect_err("no peer"), "cluster.peer", "missing");
        let err = parse(&format!("{store}peer = \"0.0.0.0:8080\"\n")).expect_err("listen");
        assert_err(&err, "cluster.peer", "already the station's listen or status address");
        let err = parse(&format!("{store}peer = \"0.0.0.0:7700\"\n")).expect_err("advertise");
        assert_err(&err, "cluster.advertise", "missing: peer 0.0.0.0:7700 binds every address");
        let err =
            parse(&format!("{store}{peer}advertise = \"0.0.0.0:1\"\n")).expect_err("unspecified");
        assert_err(&err, "cluster.advertise", "not an address another station can connect to");
        let err = parse(&format!("{store}{peer}record_ttl = 1\n")).expect_err("ttl");
        assert_err(&err, "cluster.record_ttl", "out of range; give seconds from 3 to 3600");
        let err = parse(&format!("{store}{peer}stores = 1\n")).expect_err("unknown");
        assert!(err.to_string().contains("stores"), "{err}");
    }

    #[test]
    fn station_tls_files_both_or_neither() {
        let k = keys();
        let err = station_with(&k, "").map(|c| c.tls).expect("valid");
        assert_eq!(err, None);
        let only_cert = station_example(&k).replacen('\n', "\ntls_cert_file = \"c.pem\"\n", 1);
        assert_err(&station_err(&only_cert), "tls_key_file", "missing; tls_cert_file needs it");
        let only_key = station_example(&k).replacen('\n', "\ntls_key_file = \"k.pem\"\n", 1);
        assert_err(&station_err(&only_key), "tls_cert_file", "missing; tls_key_file needs it");
        let both = station_example(&k).replacen(
            '\n',
            "\ntls_cert_file = \"/nonexistent/c.pem\"\ntls_key_file = \"k.pem\"\n",
            1,
        );
        assert_err(&station_err(&both), "tls_cert_file", "");
    }

    #[test]
    fn env_proxy_for_https_stations() {
        let pairs = [("HTTP_PROXY", "http://plain:3128"), ("https_proxy", "http://tls:3128")];
        let found = proxy_from_vars("s", HTTPS_PROXY_VARS, vars(&pairs)).expect("valid");
        assert_eq!(found.map(|p| p.host).as_deref(), Some("tls"));
        let found = proxy_from_vars("s", HTTP_PROXY_VARS, vars(&pairs)).expect("valid");
        assert_eq!(found.map(|p| p.host).as_deref(), Some("plain"));
    }

    #[test]
    fn station_url_forms() {
        let url = |text: &str| parse_station_url(text).expect("valid URL");
        assert_eq!(url("http://h").path_prefix, "/");
        assert_eq!(url("HTTP://h:80/a/b/").path_prefix, "/a/b/");
        assert_eq!(url("http://h:/x").port, 80);
        let v6 = url("http://[fd00::1]:8080/");
        assert_eq!(v6.host, "fd00::1");
        assert_eq!(v6.authority(), "[fd00::1]:8080");
        assert_eq!(url("http://[::1]/").authority(), "[::1]");
        assert_eq!(url("http://h/p%20q").path_prefix, "/p%20q/");
    }

    #[test]
    fn serial_settings_all_given() {
        let k = keys();
        let text = format!(
            "{}[[forward]]\nserial = \"/dev/ttyS1\"\nbaud = 9600\ndata_bits = 7\nparity = \"even\"\n\
             stop_bits = 2\nflow_control = \"hardware\"\ntarget = \"t\"\n\
             [services]\nconsole = {{ serial = \"/dev/ttyUSB0\", baud = 300, parity = \"odd\", flow_control = \"software\", data_bits = 5 }}\n",
            agent_head(&k, "http://s/")
        );
        let config = AgentConfig::parse(&text, "agent.toml").expect("valid");
        assert_eq!(
            config.forwards[0].source,
            ForwardSource::Serial(SerialConfig {
                path: "/dev/ttyS1".to_owned(),
                baud: 9600,
                data_bits: 7,
                parity: Parity::Even,
                stop_bits: 2,
                flow_control: FlowControl::Hardware,
            })
        );
        assert_eq!(
            config.services["console"],
            Service::Serial(SerialConfig {
                path: "/dev/ttyUSB0".to_owned(),
                baud: 300,
                data_bits: 5,
                parity: Parity::Odd,
                stop_bits: 1,
                flow_control: FlowControl::Software,
            })
        );
    }

    #[test]
    fn carrier_kinds() {
        let k = keys();
        for (text, kind) in [
            ("stream", CarrierKind::Stream),
            ("poll", CarrierKind::Poll),
            ("auto", CarrierKind::Auto),
        ] {
            let config = AgentConfig::parse(
                &format!("{}carrier = {text:?}\n", agent_head(&k, "http://s/")),
                "agent.toml",
            )
            .expect("valid");
            assert_eq!(config.carrier, kind);
        }
    }

    // --- file-level errors -------------------------------------------------

    #[test]
    fn display_names_file_field_reason() {
        let with_field =
            ConfigError::new("station.toml", "devices[0].public_key", "not valid base64");
        assert_eq!(with_field.to_string(), "station.toml: devices[0].public_key: not valid base64");
        let without = ConfigError::new("station.toml", "", "cannot open: gone");
        assert_eq!(without.to_string(), "station.toml: cannot open: gone");
    }

    #[test]
    fn toml_syntax_error_has_line_and_column() {
        let err = station_err("listen = \"0.0.0.0:1\"\nprivate_key = \n");
        assert_err(&err, "", "line 2, column 15");
        assert_eq!(err.file, "station.toml");
    }

    #[test]
    fn unknown_fields_are_named() {
        let k = keys();
        let err = station_err("lisen = \"0.0.0.0:1\"\n");
        assert_err(&err, "", "unknown field `lisen`");
        assert!(err.reason.contains("line 1, column 1"), "{err}");
        assert!(err.reason.contains("`listen`"), "expected names listed: {err}");

        let err = station_err("[[devices]]\nname = \"a\"\nkey = \"b\"\n");
        assert_err(&err, "", "unknown field `key`");
        assert!(err.reason.contains("line 3"), "{err}");

        let err =
            agent_err("[[forward]]\nlisten = \"127.0.0.1:1\"\ntarget = \"t\"\nspeed = 9600\n");
        assert_err(&err, "", "unknown field `speed`");

        let err = agent_err(&format!(
            "{}[services]\nconsole = {{ serial = \"/dev/ttyS0\", baud = 9600, speed = 1 }}\n",
            agent_head(&k, "http://s/")
        ));
        assert_err(&err, "services.console", "unknown field `speed`");
    }

    #[test]
    fn wrong_value_type_is_reported() {
        let err = station_err("listen = 8080\n");
        assert_err(&err, "", "invalid type: integer `8080`");
        assert!(err.reason.contains("line 1"), "{err}");
    }

    #[test]
    fn load_reports_missing_file() {
        let err = StationConfig::load(Path::new("/nonexistent/postern/station.toml")).unwrap_err();
        assert_eq!(err.file, "/nonexistent/postern/station.toml");
        assert_err(&err, "", "cannot open");
    }

    #[test]
    fn load_refuses_oversized_file() {
        let dir = ScratchDir::new("oversized");
        let path = dir.0.join("station.toml");
        let line = "# padding padding padding padding padding padding padding padding\n";
        let mut text = String::new();
        while text.len() as u64 <= MAX_CONFIG_BYTES {
            text.push_str(line);
        }
        std::fs::write(&path, text).expect("write");
        let err = StationConfig::load(&path).unwrap_err();
        assert_err(&err, "", "larger than 8388608 bytes");
    }

    // --- keys ----------------------------------------------------------------

    #[test]
    fn private_key_both_or_neither() {
        let k = keys();
        let err = station_err(&format!(
            "listen = \"0.0.0.0:1\"\nprivate_key = \"{}\"\nprivate_key_file = \"k\"\n",
            k.station.to_base64()
        ));
        assert_err(&err, "private_key", "both private_key and private_key_file");
        let err = station_err("listen = \"0.0.0.0:1\"\n");
        assert_err(&err, "private_key", "missing");
        let err = agent_err(&format!(
            "station = \"http://s/\"\nstation_public_key = \"{}\"\n",
            k.station.public_key().to_base64()
        ));
        assert_err(&err, "private_key", "missing");
    }

    #[test]
    fn private_key_bad_text() {
        let err = station_err("listen = \"0.0.0.0:1\"\nprivate_key = \"!!\"\n");
        assert_err(&err, "private_key", "not valid base64");
        let err = station_err(&format!(
            "listen = \"0.0.0.0:1\"\nprivate_key = \"{}\"\n",
            STANDARD.encode([1u8; 16])
        ));
        assert_err(&err, "private_key", "decodes to 16 bytes, a key is 32");
    }

    #[test]
    fn private_key_file_relative_to_config() {
        let k = keys();
        let dir = ScratchDir::new("keyfile");
        std::fs::write(dir.0.join("station.key"), format!("{}\n", k.station.to_base64()))
            .expect("write key");
        let config_path = dir.0.join("station.toml");
        std::fs::write(
            &config_path,
            "listen = \"0.0.0.0:8080\"\nprivate_key_file = \"station.key\"\n",
        )
        .expect("write config");
        let config = StationConfig::load(&config_path).expect("valid");
        assert_eq!(config.private_key.as_bytes(), k.station.as_bytes());

        // parse() looks beside the file it is told about, too.
        let config = StationConfig::parse(
            "listen = \"0.0.0.0:8080\"\nprivate_key_file = \"station.key\"\n",
            &config_path.display().to_string(),
        )
        .expect("valid");
        assert_eq!(config.private_key.as_bytes(), k.station.as_bytes());

        match load_any(&config_path) {
            Ok(AnyConfig::Station(_)) => {}
            other => panic!("expected a station config, got {other:?}"),
        }
    }

    #[test]
    fn private_key_file_errors() {
        let dir = ScratchDir::new("keyfile-errors");
        let config_path = dir.0.join("agent.toml");
        let k = keys();
        let head = format!(
            "station = \"http://s/\"\nstation_public_key = \"{}\"\n",
            k.station.public_key().to_base64()
        );

        let err = AgentConfig::parse(
            &format!("{head}private_key_file = \"missing.key\"\n"),
            &config_path.display().to_string(),
        )
        .unwrap_err();
        assert_err(&err, "private_key_file", "missing.key: cannot open");

        std::fs::write(dir.0.join("bad.key"), "not a key\n").expect("write");
        let err = AgentConfig::parse(
            &format!("{head}private_key_file = \"bad.key\"\n"),
            &config_path.display().to_string(),
        )
        .unwrap_err();
        assert_err(&err, "private_key_file", "bad.key: not valid base64");

        std::fs::write(dir.0.join("huge.key"), vec![b'A'; 4096]).expect("write");
        let err = AgentConfig::parse(
            &format!("{head}private_key_file = \"huge.key\"\n"),
            &config_path.display().to_string(),
        )
        .unwrap_err();
        assert_err(&err, "private_key_file", "larger than 1024 bytes");

        let err = AgentConfig::parse(&format!("{head}private_key_file = \"\"\n"), "agent.toml")
            .unwrap_err();
        assert_err(&err, "private_key_file", "must not be empty");
    }

    #[cfg(unix)]
    #[test]
    fn key_file_modes() {
        assert!(!key_mode_too_open(0o100600));
        assert!(!key_mode_too_open(0o100400));
        assert!(key_mode_too_open(0o100640));
        assert!(key_mode_too_open(0o100604));
        assert!(key_mode_too_open(0o100644));
    }

    // --- station fields ----------------------------------------------------

    #[test]
    fn station_addresses() {
        let k = keys();
        let key = k.station.to_base64();
        let err = station_err(&format!("listen = \"localhost:80\"\nprivate_key = \"{key}\"\n"));
        assert_err(&err, "listen", "unparseable address \"localhost:80\", expected IP:PORT");
        let err = station_err(&format!("private_key = \"{key}\"\n"));
        assert_err(&err, "listen", "missing");
        let err = station_err(&format!(
            "listen = \"0.0.0.0:1\"\nprivate_key = \"{key}\"\nstatus = \"9090\"\n"
        ));
        assert_err(&err, "status", "unparseable address \"9090\"");
        let err = station_err(&format!(
            "listen = \"0.0.0.0:1\"\nprivate_key = \"{key}\"\nstatus = \"0.0.0.0:1\"\n"
        ));
        assert_err(&err, "status", "also the carrier listen address");
        let ephemeral = StationConfig::parse(
            &format!(
                "listen = \"127.0.0.1:0\"\nprivate_key = \"{key}\"\nstatus = \"127.0.0.1:0\"\n"
            ),
            "station.toml",
        );
        assert!(ephemeral.is_ok(), "port 0 twice is two free ports: {ephemeral:?}");
    }

    #[test]
    fn station_targets() {
        let k = keys();
        let base = format!(
            "listen = \"0.0.0.0:1\"\nprivate_key = \"{}\"\n[targets]\n",
            k.station.to_base64()
        );
        let check = |line: &str| StationConfig::parse(&format!("{base}{line}\n"), "station.toml");

        assert!(check("a = \"10.0.0.5:502\"").is_ok());
        assert!(check("a = \"db.example.com:5432\"").is_ok());
        assert!(check("a = \"[fd00::5]:502\"").is_ok());

        let cases = [
            ("a = \"10.0.0.5\"", "targets.a", "no port"),
            ("a = \"10.0.0.5:0\"", "targets.a", "port \"0\" is not a number from 1 to 65535"),
            ("a = \"10.0.0.5:70000\"", "targets.a", "port \"70000\""),
            ("a = \"10.0.0.5:http\"", "targets.a", "port \"http\""),
            ("a = \":502\"", "targets.a", "empty host"),
            ("a = \"fd00::5:502\"", "targets.a", "needs brackets"),
            ("a = \"[fd00::5:502\"", "targets.a", "without a closing ']'"),
            ("a = \"[nope]:502\"", "targets.a", "not an IPv6 address"),
            ("a = \"bad host:502\"", "targets.a", "not allowed in a host name"),
            ("\"\" = \"10.0.0.5:502\"", "targets.\"\"", "must not be empty"),
        ];
        for (line, field, reason) in cases {
            let err = check(line).expect_err(line);
            assert_err(&err, field, reason);
        }
    }

    #[test]
    fn device_public_key_errors() {
        let k = keys();
        let err =
            station_with(&k, "[[devices]]\nname = \"b\"\npublic_key = \"***\"\n").unwrap_err();
        assert_eq!(err.to_string(), "station.toml: devices[1].public_key: not valid base64");
        let err = station_with(&k, "[[devices]]\nname = \"b\"\n").unwrap_err();
        assert_err(&err, "devices[1].public_key", "missing");
        let err = station_with(
            &k,
            &format!(
                "[[devices]]\nname = \"b\"\npublic_key = \"{}\"\n",
                k.device.public_key().to_base64()
            ),
        )
        .unwrap_err();
        assert_err(&err, "devices[1].public_key", "same key as devices[0]");
        let err = station_with(
            &k,
            &format!(
                "[[devices]]\nname = \"b\"\npublic_key = \"{}\"\n",
                k.station.public_key().to_base64()
            ),
        )
        .unwrap_err();
        assert_err(&err, "devices[1].public_key", "station's own public key");
    }

    #[test]
    fn device_names() {
        let k = keys();
        let other = PrivateKey::generate().public_key().to_base64();
        let err = station_with(
            &k,
            &format!("[[devices]]\nname = \"pump-17\"\npublic_key = \"{other}\"\n"),
        )
        .unwrap_err();
        assert_err(&err, "devices[1].name", "\"pump-17\" is also the name of devices[0]");
        let err =
            station_with(&k, &format!("[[devices]]\nname = \"\"\npublic_key = \"{other}\"\n"))
                .unwrap_err();
        assert_err(&err, "devices[1].name", "must not be empty");
        let err =
            station_with(&k, &format!("[[devices]]\npublic_key = \"{other}\"\n")).unwrap_err();
        assert_err(&err, "devices[1].name", "missing");
        let long = "x".repeat(65);
        let err = station_with(
            &k,
            &format!("[[devices]]\nname = \"{long}\"\npublic_key = \"{other}\"\n"),
        )
        .unwrap_err();
        assert_err(&err, "devices[1].name", "longer than 64 bytes");
        let err =
            station_with(&k, &format!("[[devices]]\nname = \"a\\nb\"\npublic_key = \"{other}\"\n"))
                .unwrap_err();
        assert_err(&err, "devices[1].name", "control character");
    }

    #[test]
    fn device_allow_must_name_targets() {
        let k = keys();
        let other = PrivateKey::generate().public_key().to_base64();
        let err = station_with(
            &k,
            &format!(
                "[[devices]]\nname = \"b\"\npublic_key = \"{other}\"\nallow = [\"billing\"]\n"
            ),
        )
        .unwrap_err();
        assert_err(
            &err,
            "devices[1].allow",
            "\"billing\" is not in [targets]; defined targets: collector",
        );

        let err = station_err(&format!(
            "listen = \"0.0.0.0:1\"\nprivate_key = \"{}\"\n[[devices]]\nname = \"a\"\npublic_key = \"{other}\"\nallow = [\"x\"]\n",
            k.station.to_base64()
        ));
        assert_err(&err, "devices[0].allow", "no [targets] are defined");
    }

    #[test]
    fn device_expose_errors() {
        let k = keys();
        let other = PrivateKey::generate().public_key().to_base64();
        let device =
            format!("[[devices]]\nname = \"b\"\npublic_key = \"{other}\"\n[devices.expose]\n");

        let err =
            station_with(&k, &format!("{device}\"127.0.0.1:15020\" = \"console\"\n")).unwrap_err();
        assert_err(&err, "devices[1].expose.\"127.0.0.1:15020\"", "already exposed by devices[0]");
        let err = station_with(&k, &format!("{device}\"15021\" = \"console\"\n")).unwrap_err();
        assert_err(&err, "devices[1].expose.15021", "unparseable address \"15021\"");
        let err = station_with(&k, &format!("{device}\"127.0.0.1:15021\" = \"\"\n")).unwrap_err();
        assert_err(&err, "devices[1].expose.\"127.0.0.1:15021\"", "service name must not be empty");
        let err =
            station_with(&k, &format!("{device}\"0.0.0.0:8080\" = \"console\"\n")).unwrap_err();
        assert_err(&err, "devices[1].expose.\"0.0.0.0:8080\"", "listen or status address");
    }

    // --- agent fields ------------------------------------------------------

    #[test]
    fn station_url_errors() {
        let k = keys();
        #[cfg(not(feature = "tls"))]
        for reason in ["https is not supported", "built without TLS (cargo feature `tls`"] {
            let err = agent_err(&agent_head(&k, "https://s/"));
            assert_err(&err, "station", reason);
        }
        let cases = [
            ("ftp://s/", "scheme \"ftp\" is not supported"),
            ("station.example.com", "is not a URL"),
            ("http://s/?x=1", "a query (?...) is not supported"),
            ("http://s/#top", "a fragment"),
            ("http://u:p@s/", "user:password@ is not used"),
            ("http://s:99999/", "port \"99999\""),
            ("http:///path", "empty host"),
            ("http://s/a b/", "contains ' '"),
            ("http://s/%zz/", "'%' not followed by two hex digits"),
        ];
        for (url, reason) in cases {
            let err = agent_err(&agent_head(&k, url));
            assert_err(&err, "station", reason);
        }
        let err = agent_err("station_public_key = \"x\"\n");
        assert_err(&err, "station", "missing");
    }

    #[test]
    fn station_public_key_errors() {
        let k = keys();
        let err = agent_err("station = \"http://s/\"\nstation_public_key = \"abc\"\n");
        assert_err(&err, "station_public_key", "not valid base64");
        let err = agent_err("station = \"http://s/\"\n");
        assert_err(&err, "station_public_key", "missing");
        let err = agent_err(&format!(
            "station = \"http://s/\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n",
            k.device.public_key().to_base64(),
            k.device.to_base64()
        ));
        assert_err(&err, "station_public_key", "this agent's own public key");
    }

    #[test]
    fn proxy_urls() {
        let proxy = parse_proxy_url("http://proxy.local").expect("valid");
        assert_eq!(proxy.port, 80);
        assert_eq!(proxy.auth, None);
        assert_eq!(proxy.authorization(), None);

        let proxy = parse_proxy_url("http://user:pass@proxy:3128/").expect("valid");
        assert_eq!(proxy.authorization().as_deref(), Some("Basic dXNlcjpwYXNz"));

        let proxy = parse_proxy_url("http://dom%5Cuser:p%40ss%3Aw@[fd00::3]:8080").expect("valid");
        assert_eq!(proxy.host, "fd00::3");
        assert_eq!(proxy.port, 8080);
        assert_eq!(proxy.auth, Some(("dom\\user".to_owned(), "p@ss:w".to_owned())));

        let proxy = parse_proxy_url("http://alice@proxy:3128").expect("valid");
        assert_eq!(proxy.auth, Some(("alice".to_owned(), String::new())));

        let debug = format!("{:?}", parse_proxy_url("http://u:secret@p:1").expect("valid"));
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn proxy_errors() {
        let k = keys();
        let cases = [
            ("https://proxy:3128", "https is not supported"),
            ("socks5://proxy:1080", "scheme \"socks5\" is not supported"),
            ("http://proxy:3128/path", "a proxy URL has no path"),
            ("http://u%zz:p@proxy:3128", "user name: \"u%zz\" has '%' not followed"),
            ("http://u:p%4@proxy:3128", "password: \"p%4\" has '%'"),
            ("http://u:p%FF@proxy:3128", "password: not UTF-8"),
            ("http://:p@proxy:3128", "empty user name"),
            ("http://a%3Ab:p@proxy:3128", "cannot contain ':'"),
            ("   ", "empty; remove the line"),
        ];
        for (url, reason) in cases {
            let err = agent_err(&format!("{}proxy = {url:?}\n", agent_head(&k, "http://s/")));
            assert_err(&err, "proxy", reason);
        }
    }

    #[test]
    fn carrier_unknown_value() {
        let k = keys();
        let err = agent_err(&format!("{}carrier = \"fast\"\n", agent_head(&k, "http://s/")));
        assert_err(&err, "", "unknown variant `fast`");
    }

    #[test]
    fn forward_errors() {
        let k = keys();
        let head = agent_head(&k, "http://s/");
        let err_of = |body: &str| agent_err(&format!("{head}[[forward]]\n{body}\n"));
        let cases = [
            (
                "listen = \"127.0.0.1:1\"\nserial = \"/dev/ttyS0\"\ntarget = \"t\"",
                "forward[0]",
                "has both listen and serial",
            ),
            ("target = \"t\"", "forward[0]", "needs listen"),
            ("listen = \"127.0.0.1\"\ntarget = \"t\"", "forward[0].listen", "unparseable address"),
            ("listen = \"127.0.0.1:1\"", "forward[0].target", "missing"),
            ("listen = \"127.0.0.1:1\"\ntarget = \"\"", "forward[0].target", "must not be empty"),
            (
                "listen = \"127.0.0.1:1\"\nbaud = 9600\ntarget = \"t\"",
                "forward[0].baud",
                "applies only to a serial forward",
            ),
            (
                "listen = \"127.0.0.1:1\"\nparity = \"odd\"\ntarget = \"t\"",
                "forward[0].parity",
                "applies only to a serial forward",
            ),
            ("serial = \"/dev/ttyS0\"\ntarget = \"t\"", "forward[0].baud", "missing"),
            (
                "serial = \"/dev/ttyS0\"\nbaud = 0\ntarget = \"t\"",
                "forward[0].baud",
                "greater than 0",
            ),
            (
                "serial = \"/dev/ttyS0\"\nbaud = 9600\ndata_bits = 9\ntarget = \"t\"",
                "forward[0].data_bits",
                "must be 5, 6, 7 or 8",
            ),
            (
                "serial = \"/dev/ttyS0\"\nbaud = 9600\ndata_bits = 4\ntarget = \"t\"",
                "forward[0].data_bits",
                "must be 5, 6, 7 or 8",
            ),
            (
                "serial = \"/dev/ttyS0\"\nbaud = 9600\nstop_bits = 3\ntarget = \"t\"",
                "forward[0].stop_bits",
                "must be 1 or 2",
            ),
            (
                "serial = \"ttyS0\"\nbaud = 9600\ntarget = \"t\"",
                "forward[0].serial",
                "absolute device path",
            ),
        ];
        for (body, field, reason) in cases {
            assert_err(&err_of(body), field, reason);
        }
        assert_err(
            &err_of("serial = \"/dev/ttyS0\"\nbaud = 9600\nparity = \"mark\"\ntarget = \"t\""),
            "",
            "unknown variant `mark`",
        );
        assert_err(&err_of("serial = \"/dev/ttyS0\"\nbaud = -1\ntarget = \"t\""), "", "line");
    }

    #[test]
    fn forward_conflicts() {
        let k = keys();
        let head = agent_head(&k, "http://s/");
        let err = agent_err(&format!(
            "{head}[[forward]]\nlisten = \"127.0.0.1:1\"\ntarget = \"a\"\n\
             [[forward]]\nlisten = \"127.0.0.1:1\"\ntarget = \"b\"\n"
        ));
        assert_err(&err, "forward[1].listen", "127.0.0.1:1 is also forward[0].listen");
        let ephemeral = AgentConfig::parse(
            &format!(
                "{head}[[forward]]\nlisten = \"127.0.0.1:0\"\ntarget = \"a\"\n\
                 [[forward]]\nlisten = \"127.0.0.1:0\"\ntarget = \"b\"\n"
            ),
            "agent.toml",
        );
        assert_eq!(ephemeral.expect("two port-0 forwards do not clash").forwards.len(), 2);

        // status is a listener too: head's top-level keys come before the tables.
        let err = agent_err(&format!(
            "status = \"127.0.0.1:1\"\n{head}[[forward]]\nlisten = \"127.0.0.1:1\"\ntarget = \"a\"\n"
        ));
        assert_err(&err, "status", "127.0.0.1:1 is also forward[0].listen");
        let err = agent_err(&format!("status = \"9091\"\n{head}"));
        assert_err(&err, "status", "unparseable address \"9091\"");
        let status =
            AgentConfig::parse(&format!("status = \"127.0.0.1:9091\"\n{head}"), "agent.toml");
        assert_eq!(
            status.expect("a status address").status,
            Some("127.0.0.1:9091".parse().unwrap())
        );

        let err = agent_err(&format!(
            "{head}[[forward]]\nserial = \"/dev/ttyS0\"\nbaud = 9600\ntarget = \"a\"\n\
             [services]\nconsole = {{ serial = \"/dev/ttyS0\", baud = 9600 }}\n"
        ));
        assert_err(
            &err,
            "services.console.serial",
            "/dev/ttyS0 is already used by forward[0].serial",
        );
    }

    #[test]
    fn service_errors() {
        let k = keys();
        let head = format!("{}[services]\n", agent_head(&k, "http://s/"));
        let cases = [
            ("modbus = \"127.0.0.1\"", "services.modbus", "no port"),
            ("modbus = 502", "services.modbus", "found integer"),
            ("\"\" = \"127.0.0.1:502\"", "services.\"\"", "service name must not be empty"),
            ("console = { baud = 9600 }", "services.console", "missing field `serial`"),
            ("console = { serial = \"/dev/ttyS0\" }", "services.console.baud", "missing"),
            (
                "console = { serial = \"/dev/ttyS0\", baud = 9600, stop_bits = 0 }",
                "services.console.stop_bits",
                "must be 1 or 2",
            ),
            (
                "console = { serial = \"/dev/ttyS0\", baud = 9600, parity = \"mark\" }",
                "services.console",
                "unknown variant `mark`",
            ),
        ];
        for (line, field, reason) in cases {
            assert_err(&agent_err(&format!("{head}{line}\n")), field, reason);
        }
    }

    #[test]
    fn load_any_tells_kinds_apart() {
        let k = keys();
        let dir = ScratchDir::new("load-any");
        let agent_path = dir.0.join("agent.toml");
        std::fs::write(&agent_path, agent_example(&k)).expect("write");
        assert!(matches!(load_any(&agent_path), Ok(AnyConfig::Agent(_))));

        let station_path = dir.0.join("station.toml");
        std::fs::write(&station_path, station_example(&k)).expect("write");
        assert!(matches!(load_any(&station_path), Ok(AnyConfig::Station(_))));

        let broken_path = dir.0.join("broken.toml");
        std::fs::write(&broken_path, "station = \"ftp://x/\"\n").expect("write");
        let err = load_any(&broken_path).unwrap_err();
        assert_err(&err, "station", "scheme \"ftp\"");

        std::fs::write(&broken_path, "[[[\n").expect("write");
        let err = load_any(&broken_path).unwrap_err();
        assert_err(&err, "", "line 1");
    }

    // --- environment ---------------------------------------------------------

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> =
            pairs.iter().map(|(k, v)| ((*k).to_owned(), OsString::from(v))).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn env_proxy_selection() {
        let host_of = |found: Option<ProxyUrl>| found.map(|p| p.host);
        let pick = |pairs: &[(&str, &str)]| {
            host_of(
                proxy_from_vars("station.example.com", HTTP_PROXY_VARS, vars(pairs))
                    .expect("valid"),
            )
        };
        assert_eq!(pick(&[]), None);
        assert_eq!(pick(&[("http_proxy", "http://lower:3128")]).as_deref(), Some("lower"));
        assert_eq!(
            pick(&[("HTTP_PROXY", "http://upper:3128"), ("http_proxy", "http://lower:3128")])
                .as_deref(),
            Some("upper")
        );
        assert_eq!(
            pick(&[("HTTP_PROXY", ""), ("http_proxy", "http://lower:3128")]).as_deref(),
            Some("lower")
        );
        let bare = proxy_from_vars("s", HTTP_PROXY_VARS, vars(&[("HTTP_PROXY", "proxy:3128")]))
            .expect("valid")
            .expect("a proxy");
        assert_eq!((bare.host.as_str(), bare.port), ("proxy", 3128));
    }

    #[test]
    fn env_proxy_error_names_variable() {
        let err = proxy_from_vars("s", HTTP_PROXY_VARS, vars(&[("http_proxy", "https://p:1")]))
            .unwrap_err();
        assert_eq!(err.file, "environment");
        assert_err(&err, "http_proxy", "https is not supported");
        assert!(err.to_string().starts_with("environment: http_proxy: https"));
    }

    #[test]
    fn env_no_proxy() {
        let proxied = |host: &str, no_proxy: &str| {
            proxy_from_vars(
                host,
                HTTP_PROXY_VARS,
                vars(&[("HTTP_PROXY", "http://p:3128"), ("no_proxy", no_proxy)]),
            )
            .expect("valid")
            .is_some()
        };
        assert!(!proxied("station.example.com", "*"));
        assert!(!proxied("station.example.com", "localhost, example.com"));
        assert!(!proxied("station.example.com", ".example.com"));
        assert!(!proxied("Station.Example.COM", "station.example.com"));
        assert!(!proxied("10.0.0.7", "10.0.0.7"));
        assert!(!proxied("fd00::7", "[fd00::7]"));
        assert!(proxied("station.example.com", "ample.com"));
        assert!(proxied("station.example.com", "other.org,,"));
        assert!(proxied("10.0.0.7", "0.0.7"));
        assert!(proxied("10.0.0.7", "10.0.0.70"));
        // NO_PROXY wins over no_proxy when both are set.
        assert!(proxy_from_vars(
            "s.example",
            HTTP_PROXY_VARS,
            vars(&[
                ("HTTP_PROXY", "http://p:3128"),
                ("NO_PROXY", "other"),
                ("no_proxy", "s.example")
            ])
        )
        .expect("valid")
        .is_some());
    }

    #[test]
    fn keys_rotate_as_lists() {
        let k = keys();
        let new_device = PrivateKey::generate().public_key();
        let next_station = PrivateKey::generate();
        let text = station_example(&k)
            .replace(
                &format!("public_key = \"{}\"", k.device.public_key().to_base64()),
                &format!(
                    "public_key = [\"{}\", \"{}\"]",
                    k.device.public_key().to_base64(),
                    new_device.to_base64()
                ),
            )
            .replacen("\n", &format!("\nnext_private_key = \"{}\"\n", next_station.to_base64()), 1);
        let config = StationConfig::parse(&text, "station.toml").expect("valid");
        assert_eq!(config.devices[0].public_keys, vec![k.device.public_key(), new_device]);
        assert_eq!(
            config.next_private_key.map(|key| key.public_key()),
            Some(next_station.public_key())
        );

        let agent = agent_example(&k).replace(
            &format!("station_public_key = \"{}\"", k.station.public_key().to_base64()),
            &format!(
                "station_public_key = [\"{}\", \"{}\"]",
                next_station.public_key().to_base64(),
                k.station.public_key().to_base64()
            ),
        );
        let config = AgentConfig::parse(&agent, "agent.toml").expect("valid");
        assert_eq!(
            config.station_public_keys,
            vec![next_station.public_key(), k.station.public_key()]
        );
    }

    #[test]
    fn key_lists_are_checked() {
        let k = keys();
        let own = k.device.public_key().to_base64();
        let other = PrivateKey::generate().public_key().to_base64();
        let device = |keys: &str| format!("[[devices]]\nname = \"b\"\npublic_key = {keys}\n");
        let err = station_with(&k, &device("[]")).unwrap_err();
        assert_err(&err, "devices[1].public_key", "empty list");
        let err = station_with(&k, &device(&format!("[\"{other}\", \"{other}\"]"))).unwrap_err();
        assert_err(&err, "devices[1].public_key", "same key twice");
        let err = station_with(&k, &device(&format!("[\"{other}\", \"{own}\"]"))).unwrap_err();
        assert_err(&err, "devices[1].public_key", "same key as devices[0]");
        let err = station_with(&k, &device("[\"AAAA\", 7]")).unwrap_err();
        assert_err(&err, "devices[1].public_key", "decodes to 3 bytes");
        let err = station_with(&k, &device(&format!("[\"{other}\", 7]"))).unwrap_err();
        assert_err(&err, "devices[1].public_key", "found integer");
        let five: Vec<String> = (0..5)
            .map(|_| format!("\"{}\"", PrivateKey::generate().public_key().to_base64()))
            .collect();
        let err = station_with(&k, &device(&format!("[{}]", five.join(", ")))).unwrap_err();
        assert_err(&err, "devices[1].public_key", "at most 4");

        let same = station_example(&k).replacen(
            "\n",
            &format!("\nnext_private_key = \"{}\"\n", k.station.to_base64()),
            1,
        );
        assert_err(&station_err(&same), "next_private_key", "same key as private_key");
        let both = station_example(&k).replacen(
            "\n",
            "\nnext_private_key = \"x\"\nnext_private_key_file = \"y\"\n",
            1,
        );
        assert_err(&station_err(&both), "next_private_key", "both next_private_key and");
        let next_is_device = station_example(&k).replacen(
            "\n",
            &format!("\nnext_private_key = \"{}\"\n", k.device.to_base64()),
            1,
        );
        assert_err(
            &station_err(&next_is_device),
            "devices[0].public_key",
            "station's own public key",
        );

        let agent = agent_example(&k).replace(
            &format!("station_public_key = \"{}\"", k.station.public_key().to_base64()),
            &format!("station_public_key = [\"{}\"]", k.device.public_key().to_base64()),
        );
        assert_err(&agent_err(&agent), "station_public_key", "agent's own public key");
    }
}
