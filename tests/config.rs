//! Config errors through the real binary: `postern check -c` and startup
//! of `station`/`agent` both exit non-zero with one line naming the file,
//! the field and what is wrong. Valid configs pass `check`, and key files
//! work as well as inline keys.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::*;
use postern::keys::PrivateKey;

/// Longest a config check or a failing startup may take.
const QUICK: Duration = Duration::from_secs(30);

fn station_text(keys: &Keys, extra: &str) -> String {
    format!("listen = \"127.0.0.1:0\"\nprivate_key = \"{}\"\n{extra}", keys.station.to_base64())
}

fn device_text(keys: &Keys, allow: &str) -> String {
    format!(
        "\n[[devices]]\nname = \"pump-17\"\npublic_key = \"{}\"\nallow = [{allow}]\n",
        keys.device.public_key().to_base64()
    )
}

fn agent_text(keys: &Keys, extra: &str) -> String {
    format!(
        "station = \"http://127.0.0.1:1/\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n{extra}",
        keys.station.public_key().to_base64(),
        keys.device.to_base64()
    )
}

/// `check -c` and the matching startup both fail with exactly
/// `postern: FILE: FIELD: REASON`.
fn assert_rejected(dir: &TempDir, name: &str, text: &str, field_and_reason: &str) {
    for stderr in rejections(dir, name, text) {
        let file = dir.path().join(name);
        let expected = format!("postern: {}: {field_and_reason}\n", file.display());
        assert_eq!(stderr, expected, "{name}\n--- file ---\n{text}");
    }
}

/// As [`assert_rejected`] for an unknown field: the message is exact up to
/// the list of valid fields, which grows with the config, and that list
/// names `suggestion`.
fn assert_unknown_field(dir: &TempDir, name: &str, text: &str, start: &str, suggestion: &str) {
    for stderr in rejections(dir, name, text) {
        let file = dir.path().join(name);
        let expected = format!("postern: {}: {start}, expected one of ", file.display());
        assert!(stderr.starts_with(&expected), "{name}: {stderr:?} should start {expected:?}");
        let listed = format!("`{suggestion}`");
        assert!(stderr.contains(&listed), "{name}: {stderr:?} should list {listed}");
        assert_eq!(stderr.lines().count(), 1, "{name}: one line: {stderr:?}");
    }
}

/// Runs `check -c` and the matching startup on `text`; both must exit 1
/// with nothing on stdout. Returns their stderr.
fn rejections(dir: &TempDir, name: &str, text: &str) -> Vec<String> {
    let path = dir.write(name, text);
    let file = path.to_str().expect("utf-8 path");
    let role = if name.starts_with("agent") { "agent" } else { "station" };
    ["check", role]
        .into_iter()
        .map(|command| {
            let out = run(&[command, "-c", file], None, QUICK);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{command} -c {name} should fail: {}",
                out.stderr
            );
            assert_eq!(out.stdout, "", "{command} -c {name} prints nothing on stdout");
            out.stderr
        })
        .collect()
}

#[test]
fn station_config_errors_name_file_field_and_reason() {
    let dir = TempDir::new("station-config");
    let keys = Keys::new();
    let targets = "\n[targets]\ncollector = \"127.0.0.1:502\"\n";

    assert_unknown_field(
        &dir,
        "unknown-field.toml",
        &format!("{}stauts = \"127.0.0.1:9090\"\n", station_text(&keys, "")),
        "line 3, column 1: unknown field `stauts`",
        "status",
    );
    assert_unknown_field(
        &dir,
        "unknown-device-field.toml",
        &format!(
            "{}{}alow = [\"collector\"]\n",
            station_text(&keys, targets),
            device_text(&keys, "")
        ),
        "line 11, column 1: unknown field `alow`",
        "allow",
    );
    assert_rejected(
        &dir,
        "bad-base64.toml",
        &station_text(
            &keys,
            &format!("{targets}\n[[devices]]\nname = \"pump-17\"\npublic_key = \"not*base64\"\n"),
        ),
        "devices[0].public_key: not valid base64",
    );
    let short_key = &keys.device.to_base64()[..40];
    assert_rejected(
        &dir,
        "short-key.toml",
        &format!("listen = \"127.0.0.1:0\"\nprivate_key = \"{short_key}\"\n"),
        "private_key: decodes to 30 bytes, a key is 32",
    );
    assert_rejected(
        &dir,
        "bad-listen.toml",
        &format!("listen = \"localhost:8080\"\nprivate_key = \"{}\"\n", keys.station.to_base64()),
        "listen: unparseable address \"localhost:8080\", expected IP:PORT such as \
         127.0.0.1:5020 (host names are not resolved here)",
    );
    assert_rejected(
        &dir,
        "bad-target.toml",
        &station_text(&keys, "\n[targets]\ncollector = \"10.0.0.5\"\n"),
        "targets.collector: \"10.0.0.5\": no port; expected HOST:PORT",
    );
    assert_rejected(
        &dir,
        "allow-nothing.toml",
        &format!("{}{}", station_text(&keys, targets), device_text(&keys, "\"billing\"")),
        "devices[0].allow: \"billing\" is not in [targets]; defined targets: collector",
    );
    let missing = dir.path().join("missing.key");
    assert_rejected(
        &dir,
        "missing-key-file.toml",
        "listen = \"127.0.0.1:0\"\nprivate_key_file = \"missing.key\"\n",
        &format!(
            "private_key_file: {}: cannot open: No such file or directory (os error 2)",
            missing.display()
        ),
    );
}

#[test]
fn agent_config_errors_name_file_field_and_reason() {
    let dir = TempDir::new("agent-config");
    let keys = Keys::new();
    let forward = "\n[[forward]]\nlisten = \"127.0.0.1:0\"\ntarget = \"collector\"\n";

    assert_unknown_field(
        &dir,
        "agent-unknown-field.toml",
        &agent_text(&keys, "\n[[forward]]\nlisten = \"127.0.0.1:0\"\ntraget = \"collector\"\n"),
        "line 7, column 1: unknown field `traget`",
        "target",
    );
    assert_rejected(
        &dir,
        "agent-bad-carrier.toml",
        &agent_text(&keys, "carrier = \"websocket\"\n"),
        "line 4, column 11: unknown variant `websocket`, expected one of `auto`, `stream`, `poll`",
    );
    assert_rejected(
        &dir,
        "agent-bad-station-key.toml",
        &format!(
            "station = \"http://127.0.0.1:1/\"\nstation_public_key = \"{}*\"\nprivate_key = \"{}\"\n",
            &keys.station.public_key().to_base64()[..43],
            keys.device.to_base64()
        ),
        "station_public_key: not valid base64",
    );
    assert_rejected(
        &dir,
        "agent-long-key.toml",
        &format!(
            "station = \"http://127.0.0.1:1/\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n",
            keys.station.public_key().to_base64(),
            STANDARD.encode([7u8; 33])
        ),
        "private_key: decodes to 33 bytes, a key is 32",
    );
    assert_rejected(
        &dir,
        "agent-bad-listen.toml",
        &agent_text(&keys, "\n[[forward]]\nlisten = \"127.0.0.1:99999\"\ntarget = \"collector\"\n"),
        "forward[0].listen: unparseable address \"127.0.0.1:99999\", expected IP:PORT such as \
         127.0.0.1:5020 (host names are not resolved here)",
    );
    // TLS settings (issue 15): only for an https:// station, and checked.
    assert_rejected(
        &dir,
        "agent-ca-file-http.toml",
        &agent_text(&keys, "ca_file = \"ca.pem\"\n"),
        "ca_file: applies only to an https:// station; the station URL is http://",
    );
    let https = |extra: &str| {
        format!(
            "station = \"https://station.example.com/\"\nstation_public_key = \"{}\"\n\
             private_key = \"{}\"\n{extra}{forward}",
            keys.station.public_key().to_base64(),
            keys.device.to_base64()
        )
    };
    assert_rejected(
        &dir,
        "agent-short-pin.toml",
        &https("tls_pin = [\"sha256//AAAA\"]\n"),
        "tls_pin[0]: \"sha256//AAAA\" is 3 bytes, a SHA-256 is 32",
    );
    let missing = dir.path().join("no-such-ca.pem");
    assert_rejected(
        &dir,
        "agent-missing-ca.toml",
        &https(&format!("ca_file = {:?}\n", missing.display().to_string())),
        &format!(
            "ca_file: cannot read {}: No such file or directory (os error 2)",
            missing.display()
        ),
    );
    assert_rejected(
        &dir,
        "agent-no-target.toml",
        &agent_text(&keys, "\n[[forward]]\nlisten = \"127.0.0.1:0\"\n"),
        "forward[0].target: missing; name one of the station's [targets]",
    );
}

#[test]
fn valid_configs_pass_check() {
    let dir = TempDir::new("valid-config");
    let keys = Keys::new();
    let station = dir.write(
        "station.toml",
        &format!(
            "{}{}",
            station_text(
                &keys,
                "status = \"127.0.0.1:0\"\n\n[targets]\ncollector = \"10.0.0.5:502\"\n\
                 billing = \"billing.internal:8443\"\n"
            ),
            device_text(&keys, "\"collector\"")
        ),
    );
    let agent = dir.write(
        "agent.toml",
        &agent_text(
            &keys,
            "carrier = \"poll\"\n\n[[forward]]\nlisten = \"127.0.0.1:0\"\ntarget = \"collector\"\n\
             \n[[forward]]\nlisten = \"127.0.0.1:0\"\ntarget = \"billing\"\n\
             \n[services]\nmodbus = \"127.0.0.1:502\"\n",
        ),
    );
    for (path, summary) in [
        (&station, "station config OK (1 devices, 2 targets)"),
        (&agent, "agent config OK (2 forwards, 1 services; direct)"),
    ] {
        let file = path.to_str().expect("utf-8 path");
        let out = run(&["check", "-c", file], None, QUICK);
        assert!(out.status.success(), "check -c {file}: {}", out.stderr);
        assert_eq!(out.stdout, format!("{file}: {summary}\n"));
        assert_eq!(out.stderr, "");
    }
}

/// `private_key_file` on both sides, relative to the config's directory:
/// the tunnel works, and a key file others can read draws a warning.
#[test]
fn key_files_work_and_loose_modes_warn() {
    use std::os::unix::fs::PermissionsExt;

    let dir = TempDir::new("key-files");
    let keys = Keys::new();
    let write_key = |name: &str, key: &PrivateKey, mode: u32| {
        let path = dir.write(name, &format!("{}\n", key.to_base64()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .expect("chmod key file");
    };
    write_key("station.key", &keys.station, 0o644);
    write_key("device.key", &keys.device, 0o600);

    let echo = Server::echo();
    let devices = [("pump-17", keys.device.public_key(), &["echo"][..])];
    let inline = station_toml(&keys.station, &[("echo", echo.target())], &devices);
    let from_file = inline.replace(
        &format!("private_key = \"{}\"", keys.station.to_base64()),
        "private_key_file = \"station.key\"",
    );
    assert_ne!(inline, from_file, "the station config now names its key file");
    let (station, addr) = start_station(&dir, &from_file);

    let inline = agent_toml(addr, &keys.station.public_key(), &keys.device, "stream", &["echo"]);
    let from_file = inline.replace(
        &format!("private_key = \"{}\"", keys.device.to_base64()),
        "private_key_file = \"device.key\"",
    );
    assert_ne!(inline, from_file, "the agent config now names its key file");
    let (agent, forwards) = start_agent(&dir, "agent", &from_file, &["echo"]);
    agent.wait_log(&["connected to the station"]);
    assert_eq!(
        echo_round_trip(forwards["echo"], 21, 1 << 20),
        Received::expected(21, 1 << 20),
        "tunnel with keys from files\n{}\n{}",
        agent.describe(),
        station.describe()
    );

    let station_key = dir.path().join("station.key");
    let warning = format!(
        "private_key_file {} can be read by group or others (mode 644); run chmod 600",
        station_key.display()
    );
    assert_eq!(station.stderr.count(&warning), 1, "station warns once:\n{}", station.describe());
    assert_eq!(agent.stderr.count("can be read by group or others"), 0, "agent key is 0600");
}

/// `check` takes the proxy from the environment as the agent does at
/// start: a config it calls OK is one the agent starts with.
#[test]
fn check_judges_the_proxy_from_the_environment_as_the_agent_does() {
    let dir = TempDir::new("env-proxy");
    let keys = Keys::new();
    let agent = dir.write("agent.toml", &agent_text(&keys, ""));
    let check = |proxy: &str| {
        let mut command = std::process::Command::new(common::BIN);
        command.args(["check", "-c", agent.to_str().expect("utf-8 path")]);
        for var in
            ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"]
        {
            command.env_remove(var);
        }
        command.env("HTTP_PROXY", proxy).output().expect("run postern check")
    };
    let bad = check("ftp://proxy.example:21");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{stderr}");
    assert!(stderr.contains("HTTP_PROXY"), "{stderr}");
    let good = check("http://proxy.example:3128");
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    assert!(stdout.ends_with("; through proxy proxy.example:3128)\n"), "{stdout}");
}
