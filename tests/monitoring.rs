//! The alerting rules and the Grafana dashboard in `packaging/monitoring/`,
//! checked with Prometheus' own tool and against a live station:
//!
//! ```text
//!  postern.rules.yml ─▶ promtool check rules; promtool test rules (alerts fire as documented)
//!  station + agent (poll) ─▶ GET /metrics ─▶ promtool check metrics (no lint)
//!                                         └─▶ every metric the rules and the dashboard name exists
//!  grafana-fleet.json ─▶ python3 json.load ─▶ its PromQL expressions
//! ```
//!
//! promtool comes from `POSTERN_PROMTOOL` (scripts/test unpacks Debian's
//! prometheus package for it) or from `PATH`; without it these tests fail,
//! saying so, rather than pass unchecked.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{
    refused_addr, start_agent, start_station, station_toml, status_addr, status_get, with_status,
    Keys, Server, TempDir,
};

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/monitoring/postern.rules.yml");
const DASHBOARD: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/monitoring/grafana-fleet.json");

/// The alerts docs/MONITORING.md describes, each of which must be in the rules.
const ALERTS: [&str; 7] = [
    "PosternDeviceOffline",
    "PosternReloadFailed",
    "PosternHandshakeRefusalsRising",
    "PosternHandshakesThrottled",
    "PosternDeviceStuckOnPoll",
    "PosternTargetUnreachable",
    "PosternClusterStoreDown",
];

/// promtool, from `POSTERN_PROMTOOL` or `PATH`.
fn promtool() -> PathBuf {
    let path = match std::env::var_os("POSTERN_PROMTOOL") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from("promtool"),
    };
    match Command::new(&path).arg("--version").output() {
        Ok(out) if out.status.success() => path,
        result => panic!(
            "promtool is needed to check packaging/monitoring: set POSTERN_PROMTOOL to its path \
             or put it on PATH (scripts/test unpacks Debian's prometheus package for it: \
             apt-get download prometheus && dpkg-deb -x prometheus_*.deb DIR, then \
             POSTERN_PROMTOOL=DIR/usr/bin/promtool); running {} gave {result:?}",
            path.display()
        ),
    }
}

/// Runs promtool with `args`, `stdin` fed to it: (success, stdout and stderr).
fn run_promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(promtool())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child.stdin.take().expect("piped stdin").write_all(stdin.as_bytes()).expect("feed promtool");
    let out = child.wait_with_output().expect("promtool's output");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The metric names in a text: words that start as postern's and the
/// process' families do.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("postern_") || word.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// The families a /metrics body exposes: its `# TYPE` lines and the names
/// of its samples.
fn exposed(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        })
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A station with `[cluster]` (its store unreachable, so the cluster's
/// families show) and one device connected over poll, scraped: what a
/// Prometheus would see.
/// The agent's own `/metrics` comes last.
fn live_scrape(dir: &TempDir) -> (common::Proc, common::Proc, String, String) {
    let echo = Server::echo();
    let keys = Keys::new();
    let devices = [("pump-17", keys.device.public_key(), &["echo"][..])];
    let mut toml = with_status(&station_toml(&keys.station, &[("echo", echo.target())], &devices));
    toml.push_str(&format!(
        "\n[cluster]\nstore = \"redis://{}\"\npeer = \"127.0.0.1:0\"\n",
        refused_addr()
    ));
    let (station, station_addr) = start_station(dir, &toml);
    let status = status_addr(&station);
    let agent_toml = with_status(&common::agent_toml(
        station_addr,
        &keys.station.public_key(),
        &keys.device,
        "poll",
        &["echo"],
    ));
    let (agent, _) = start_agent(dir, "agent", &agent_toml, &["echo"]);
    agent.wait_log(&["connected to the station"]);
    let agent_metrics = status_get(status_addr(&agent), "/metrics").1;
    let mut metrics = String::new();
    common::wait_until("the device's poll carrier in /metrics", common::LOG_WAIT, || {
        metrics = status_get(status, "/metrics").1;
        metrics.contains("postern_device_carrier{device=\"pump-17\",kind=\"poll\"} 1")
    });
    (station, agent, metrics, agent_metrics)
}

#[test]
fn the_rules_pass_promtool_and_name_every_alert() {
    let (ok, out) = run_promtool(&["check", "rules", RULES], "");
    assert!(ok && out.contains("SUCCESS: 7 rules found"), "promtool check rules:\n{out}");
    let rules = std::fs::read_to_string(RULES).expect("read the rules");
    for alert in ALERTS {
        assert!(rules.contains(&format!("- alert: {alert}\n")), "no {alert} in {RULES}");
    }
}

/// The alerts fire on the series they are written for, and only then:
/// promtool's rule tests, in simulated time.
#[test]
fn the_alerts_fire_when_they_should() {
    let dir = TempDir::new("rule-tests");
    let rules = std::fs::read_to_string(RULES).expect("read the rules");
    let rules = dir.write("postern.rules.yml", &without_annotations(&rules));
    let rules = rules.to_str().expect("utf-8 path");
    let tests = dir.write("postern.tests.yml", &RULE_TESTS.replace("RULES", rules));
    let (ok, out) = run_promtool(&["test", "rules", tests.to_str().expect("utf-8 path")], "");
    assert!(ok && out.contains("SUCCESS"), "promtool test rules:\n{out}");
}

/// The rules without their annotations: promtool compares an alert's
/// annotations whole, and the prose is for people (`check rules` has
/// parsed its templates). Each rule's `annotations:` block runs to the
/// next rule or the end, as the file is laid out.
fn without_annotations(rules: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in rules.lines() {
        if line.trim_start().starts_with("- alert:") {
            skipping = false;
        } else if line.trim() == "annotations:" {
            skipping = true;
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(!out.contains("summary:"), "annotations left in\n{out}");
    out
}

/// Series over simulated minutes, and the alerts each must raise.
const RULE_TESTS: &str = r#"
rule_files: [RULES]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # pump-1 heard at t=0 then gone; pump-2 connected throughout.
      - series: 'postern_device_last_heard_seconds{instance="s1",device="pump-1"}'
        values: '0x30'
      - series: 'postern_device_connected{instance="s1",device="pump-1"}'
        values: '0x30'
      - series: 'postern_device_last_heard_seconds{instance="s1",device="pump-2"}'
        values: '0+60x30'
      - series: 'postern_device_connected{instance="s1",device="pump-2"}'
        values: '1x30'
      # A reload applied at 60 s, one refused at 600 s.
      - series: 'postern_last_reload_seconds{instance="s1",result="success"}'
        values: '0 60x30'
      - series: 'postern_last_reload_seconds{instance="s1",result="failure"}'
        values: '0x9 600x20'
      - series: 'postern_device_carrier{instance="s1",device="pump-3",kind="poll"}'
        values: '1x70'
      - series: 'postern_handshake_refusals_total{instance="s1",reason="unknown_key"}'
        values: '0+30x30'
      - series: 'postern_handshake_refusals_total{instance="s1",reason="busy"}'
        values: '0x30'
      - series: 'postern_cluster_store_up{instance="s1"}'
        values: '1x4 0x10'
    alert_rule_test:
      - eval_time: 5m
        alertname: PosternReloadFailed
        exp_alerts: []
      - eval_time: 12m
        alertname: PosternReloadFailed
        exp_alerts:
          - exp_labels: {severity: warning, instance: s1}
      - eval_time: 20m
        alertname: PosternDeviceOffline
        exp_alerts:
          - exp_labels: {severity: warning, instance: s1, device: pump-1}
      - eval_time: 30m
        alertname: PosternHandshakeRefusalsRising
        exp_alerts:
          - exp_labels: {severity: warning, instance: s1, reason: unknown_key}
      - eval_time: 30m
        alertname: PosternHandshakesThrottled
        exp_alerts: []
      - eval_time: 50m
        alertname: PosternDeviceStuckOnPoll
        exp_alerts: []
      - eval_time: 65m
        alertname: PosternDeviceStuckOnPoll
        exp_alerts:
          - exp_labels: {severity: info, instance: s1, device: pump-3, kind: poll}
      - eval_time: 3m
        alertname: PosternClusterStoreDown
        exp_alerts: []
      - eval_time: 8m
        alertname: PosternClusterStoreDown
        exp_alerts:
          - exp_labels: {severity: critical, instance: s1}
"#;

#[test]
fn a_live_scrape_passes_promtool_and_has_every_metric_the_rules_and_dashboard_use() {
    let dir = TempDir::new("monitoring");
    let (_station, _agent, metrics, agent_metrics) = live_scrape(&dir);
    for scrape in [&metrics, &agent_metrics] {
        let (ok, out) = run_promtool(&["check", "metrics"], scrape);
        assert!(ok && out.trim().is_empty(), "promtool check metrics:\n{out}\non\n{scrape}");
    }
    assert!(
        agent_metrics.contains("\npostern_agent_carrier{kind=\"poll\"} 1\n"),
        "{agent_metrics}"
    );

    let have = exposed(&metrics);
    let rules = std::fs::read_to_string(RULES).expect("read the rules");
    let in_rules = metric_names(&rules);
    assert!(in_rules.len() >= 7, "{in_rules:?}");
    let dashboard = dashboard_queries(Path::new(DASHBOARD));
    let in_dashboard = metric_names(&dashboard);
    assert!(in_dashboard.len() >= 15, "{in_dashboard:?}");
    for (what, names) in [("rules", &in_rules), ("dashboard", &in_dashboard)] {
        let missing: Vec<&String> = names.difference(&have).collect();
        assert!(missing.is_empty(), "the {what} name metrics a station does not have: {missing:?}");
    }
}

/// The dashboard's PromQL (panel expressions and variable queries), one a
/// line, read by Python's json module: the file must load as JSON, and
/// every panel but a row must query something.
fn dashboard_queries(path: &Path) -> String {
    const SCRIPT: &str = r#"
import json, sys
board = json.load(open(sys.argv[1]))
panels = board["panels"]
bare = [p["title"] for p in panels if p["type"] != "row" and not p.get("targets")]
assert not bare, "panels without a query: %s" % bare
found = []
def walk(value, key=None):
    if isinstance(value, dict):
        for k, v in value.items():
            walk(v, k)
    elif isinstance(value, list):
        for v in value:
            walk(v, key)
    elif isinstance(value, str) and key in ("expr", "query", "definition"):
        found.append(value.replace("\n", " "))
walk(board)
print("\n".join(found))
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(path)
        .output()
        .expect("python3 runs (it reads the dashboard's JSON)");
    assert!(
        out.status.success(),
        "{} does not load: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 queries")
}
