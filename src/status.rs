//! The status listener both programs may open (`status = "ADDR"`): what
//! an operator, Prometheus and `postern status` ask a running station or
//! agent. Each program renders its own pages; this is the HTTP face they
//! share and the formats' escaping.
//!
//! ```text
//!  GET /metrics     Prometheus text 0.0.4    (scrapers, alert rules)
//!  GET /status      JSON                     (scripts; the station only)
//!  GET /status.txt  lines for people         (postern status)
//!  anything else    404
//! ```
//!
//! Meant for loopback or a private network: nothing here is authenticated.
//! A client gets [`HEAD_TIMEOUT`] to send its request and one answer, and
//! at most [`MAX_CLIENTS`] are served at once.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use smol::net::{TcpListener, TcpStream};

use crate::carrier::conn::{HttpConn, MIN_READ_BUF_BYTES};
use crate::carrier::http::{self, BodyKind};
use crate::task::Scope;

/// Time a status client has to send its request.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Status requests served at once; scrapers need one or two.
const MAX_CLIENTS: usize = 16;

/// The pages a status listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    Metrics,
    Json,
    Text,
}

impl Page {
    fn of(path: &str) -> Option<Page> {
        match path {
            "/metrics" => Some(Page::Metrics),
            "/status" => Some(Page::Json),
            "/status.txt" => Some(Page::Text),
            _ => None,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Page::Metrics => "text/plain; version=0.0.4; charset=utf-8",
            Page::Json => "application/json",
            Page::Text => "text/plain; charset=utf-8",
        }
    }
}

/// What a program's status snapshot renders, one method per page.
pub(crate) trait Pages {
    /// Prometheus text.
    fn metrics(&self) -> String;
    /// `None` answers 404: the agent has no JSON page (its text and
    /// metrics say it all, and a device build is counted in KiB).
    fn json(&self) -> Option<String>;
    /// Lines for people: what `postern status` prints.
    fn text(&self) -> String;
}

/// Serves the pages of a fresh `snapshot()` per request on `listener`
/// until the future is dropped.
pub(crate) async fn serve<S, F>(listener: TcpListener, snapshot: F)
where
    S: Pages,
    F: Fn() -> S + Send + Sync + 'static,
{
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    log::info!("status on http://{addr}/metrics and http://{addr}/status");
    let render = Arc::new(move |page: Page| {
        let snap = snapshot();
        match page {
            Page::Metrics => Some(snap.metrics()),
            Page::Json => snap.json(),
            Page::Text => Some(snap.text()),
        }
    });
    let clients = Scope::new();
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (socket, _) = crate::accept::next(&listener, || format!("status {addr}")).await;
        if open.load(Ordering::Acquire) >= MAX_CLIENTS {
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let (render, open) = (render.clone(), open.clone());
        clients.spawn(async move {
            answer(socket, &*render).await;
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn answer(socket: TcpStream, render: &(dyn Fn(Page) -> Option<String> + Send + Sync)) {
    let mut conn = HttpConn::with_capacity(socket, MIN_READ_BUF_BYTES);
    let request =
        crate::task::within(HEAD_TIMEOUT, || (), async { conn.read_request().await.map_err(drop) })
            .await;
    let Ok(Some(head)) = request else { return };
    let path = head.target.split('?').next().unwrap_or("");
    let answered = match (head.method.as_str(), Page::of(path)) {
        ("GET", Some(page)) => render(page).map(|body| (page, body)),
        _ => None,
    };
    let Some((page, body)) = answered else {
        let _ = conn.write_all(&http::unmarked_error_response(404)).await;
        return;
    };
    let mut out = Vec::with_capacity(body.len() + 200);
    let headers = [("Content-Type", page.content_type()), ("Cache-Control", "no-store")];
    http::write_response_head(
        &mut out,
        200,
        "OK",
        &headers,
        BodyKind::Length(body.len() as u64),
        false,
    );
    out.extend_from_slice(body.as_bytes());
    let _ = conn.write_all(&out).await;
}

/// Why `postern status` got no summary.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach the status listener at {addr}: {source}")]
    Unreachable { addr: SocketAddr, source: std::io::Error },
    #[error("status listener at {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("status listener at {addr}: no HTTP answer")]
    NotHttp { addr: SocketAddr },
    #[error("status listener at {addr} answered {status:?} for {path}")]
    Refused { addr: SocketAddr, status: String, path: String },
}

/// Fetches `path` from a status listener at `addr`: what `postern status`
/// prints. The answer is read up to `limit` bytes.
pub fn fetch(addr: SocketAddr, path: &str, limit: u64) -> Result<String, FetchError> {
    use std::io::{Read as _, Write as _};
    let mut socket = std::net::TcpStream::connect_timeout(&addr, HEAD_TIMEOUT)
        .map_err(|source| FetchError::Unreachable { addr, source })?;
    let io = |source| FetchError::Io { addr, source };
    socket.set_read_timeout(Some(HEAD_TIMEOUT)).map_err(io)?;
    write!(socket, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .map_err(io)?;
    let mut answer = Vec::new();
    socket.take(limit).read_to_end(&mut answer).map_err(io)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").ok_or(FetchError::NotHttp { addr })?;
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200 ") {
        let (status, path) = (status.to_owned(), path.to_owned());
        return Err(FetchError::Refused { addr, status, path });
    }
    Ok(body.to_owned())
}

/// Writes Prometheus text: one family at a time, HELP and TYPE first.
#[derive(Default)]
pub(crate) struct Exposition(String);

impl Exposition {
    /// A family with `samples` of (labels as `{a="b"}` or empty, value).
    pub(crate) fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: &[(String, String)],
    ) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(self.0, "{name}{labels} {value}");
        }
    }

    /// A family of one unlabelled sample.
    pub(crate) fn one(&mut self, name: &str, kind: &str, help: &str, value: impl ToString) {
        self.family(name, kind, help, &[(String::new(), value.to_string())]);
    }

    /// `NAME{version,commit,features} 1`: which build answers.
    pub(crate) fn build_info(&mut self, name: &str) {
        let labels = format!(
            "{{version=\"{}\",commit=\"{}\",features=\"{}\"}}",
            label(env!("CARGO_PKG_VERSION")),
            label(crate::COMMIT),
            label(&crate::FEATURES.join(","))
        );
        self.family(
            name,
            "gauge",
            "The running build: its version, git commit and the cargo features built in; always 1.",
            &[(labels, "1".into())],
        );
    }

    /// `PREFIXreloads_total` and `PREFIXlast_reload_seconds`, by result:
    /// (count, time of the last; 0 if none) of applied and refused ones.
    pub(crate) fn reloads(&mut self, prefix: &str, applied: (u64, Millis), refused: (u64, Millis)) {
        let results = [("success", applied), ("failure", refused)];
        let samples = |value: &dyn Fn((u64, Millis)) -> String| -> Vec<(String, String)> {
            results
                .iter()
                .map(|(result, tally)| (format!("{{result=\"{result}\"}}"), value(*tally)))
                .collect()
        };
        self.family(
            &format!("{prefix}reloads_total"),
            "counter",
            "Config reloads (SIGHUP) applied (success) or refused (failure).",
            &samples(&|(count, _)| count.to_string()),
        );
        self.family(
            &format!("{prefix}last_reload_seconds"),
            "gauge",
            "Unix time of the last config reload of each result; 0 if there was none.",
            &samples(&|(_, last)| if last == Millis(0) { "0".into() } else { last.to_string() }),
        );
    }

    /// `process_start_time_seconds`, the name client libraries use.
    pub(crate) fn start_time(&mut self, program: &str, started: Millis) {
        let help = format!("Start time of the {program} since the unix epoch in seconds.");
        self.one("process_start_time_seconds", "gauge", &help, started);
    }

    pub(crate) fn finish(self) -> String {
        self.0
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
pub(crate) fn label(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A duration for people: `42 s`, `7 min`, `3 h`, `2 d`.
pub(crate) fn ago(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// Milliseconds, shown as seconds with three decimals: times and durations
/// without floating point, whose formatting code would cost a device build
/// KiB for nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Millis(pub(crate) u64);

// A station-only build shows Millis but makes none of these.
#[cfg_attr(not(feature = "agent"), allow(dead_code))]
impl Millis {
    /// Since the unix epoch.
    pub(crate) fn unix(at: SystemTime) -> Millis {
        Millis(at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
    }

    pub(crate) fn of(duration: Duration) -> Millis {
        Millis(duration.as_millis() as u64)
    }

    pub(crate) fn seconds(self) -> u64 {
        self.0 / 1000
    }

    /// `self - earlier`, or zero.
    pub(crate) fn since(self, earlier: Millis) -> Millis {
        Millis(self.0.saturating_sub(earlier.0))
    }
}

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn millis_show_as_seconds() {
        assert_eq!(Millis(1_700_000_000_042).to_string(), "1700000000.042");
        assert_eq!(Millis(5).to_string(), "0.005");
        assert_eq!(Millis(9_000).since(Millis(10_000)), Millis(0));
        assert_eq!(ago(119), "119 s");
        assert_eq!(ago(7199), "119 min");
        assert_eq!(ago(172_800), "2 d");
    }

    #[test]
    fn pages_by_path() {
        assert_eq!(Page::of("/metrics"), Some(Page::Metrics));
        assert_eq!(Page::of("/status"), Some(Page::Json));
        assert_eq!(Page::of("/status.txt"), Some(Page::Text));
        assert_eq!(Page::of("/"), None);
    }
}
