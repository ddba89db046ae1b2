//! The command line contract of DESIGN.md: genkey, pubkey, --help,
//! --version, usage errors and `demo --once`, run as the real binary.

mod common;

use std::time::Duration;

use common::*;
use postern::keys::{PrivateKey, PublicKey};

/// Longest a command that does no network I/O may take.
const QUICK: Duration = Duration::from_secs(30);

/// Longest `demo --once` may take: its own transfer limit is 120 s.
const DEMO: Duration = Duration::from_secs(150);

fn genkey() -> String {
    let out = run(&["genkey"], None, QUICK);
    assert!(out.status.success(), "genkey failed: {}", out.stderr);
    assert_eq!(out.stderr, "", "genkey writes nothing to stderr");
    let key = out.stdout.strip_suffix('\n').expect("genkey ends its line").to_owned();
    assert_eq!(key.len(), 44, "a key is 44 base64 characters: {key:?}");
    PrivateKey::from_base64(&key).unwrap_or_else(|e| panic!("genkey printed a bad key: {e}"));
    key
}

fn pubkey(private: &str) -> String {
    let out = run(&["pubkey"], Some(&format!("{private}\n")), QUICK);
    assert!(out.status.success(), "pubkey failed: {}", out.stderr);
    out.stdout.strip_suffix('\n').expect("pubkey ends its line").to_owned()
}

#[test]
fn genkey_pubkey_round_trip() {
    let private = genkey();
    assert_ne!(private, genkey(), "two genkeys gave the same key");
    let public = pubkey(&private);
    let expected = PrivateKey::from_base64(&private).expect("valid").public_key().to_base64();
    assert_eq!(public, expected, "pubkey is the X25519 public key of the private key");
    assert_eq!(pubkey(&private), public, "pubkey is deterministic");
    PublicKey::from_base64(&public).expect("pubkey prints a valid public key");
}

#[test]
fn keys_from_the_cli_make_a_working_tunnel() {
    let station_private = genkey();
    let device_private = genkey();
    let station_public = PublicKey::from_base64(&pubkey(&station_private)).expect("valid");
    let device_public = PublicKey::from_base64(&pubkey(&device_private)).expect("valid");
    let station_key = PrivateKey::from_base64(&station_private).expect("valid");
    let device_key = PrivateKey::from_base64(&device_private).expect("valid");

    let echo = Server::echo();
    let dir = TempDir::new("cli-keys");
    let devices = [("cli-device", device_public, &["echo"][..])];
    let (station, addr) =
        start_station(&dir, &station_toml(&station_key, &[("echo", echo.target())], &devices));
    let toml = agent_toml(addr, &station_public, &device_key, "stream", &["echo"]);
    let (agent, forwards) = start_agent(&dir, "agent", &toml, &["echo"]);
    agent.wait_log(&["connected to the station"]);
    assert_eq!(
        echo_round_trip(forwards["echo"], 11, 1 << 20),
        Received::expected(11, 1 << 20),
        "tunnel with keys from genkey/pubkey\n{}\n{}",
        agent.describe(),
        station.describe()
    );
}

#[test]
fn pubkey_rejects_what_is_not_a_key() {
    let out = run(&["pubkey"], Some("not a key\n"), QUICK);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.stdout, "");
    assert_eq!(out.stderr, "postern: stdin is not a private key: not valid base64\n");

    let out = run(&["pubkey"], Some("AAAA\n"), QUICK);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        out.stderr,
        "postern: stdin is not a private key: decodes to 3 bytes, a key is 32\n"
    );
}

#[test]
fn help_names_every_command() {
    for flag in ["--help", "-h"] {
        let out = run(&[flag], None, QUICK);
        assert!(out.status.success(), "{flag} failed: {}", out.stderr);
        assert_eq!(out.stderr, "");
        for usage in [
            "postern genkey",
            "postern pubkey < KEY",
            "postern station -c FILE.toml",
            "postern agent -c FILE.toml",
            "postern check -c FILE.toml",
            "postern status -c FILE.toml",
            "postern demo [--once]",
            "--version",
        ] {
            assert!(out.stdout.contains(usage), "{flag} lacks {usage:?}:\n{}", out.stdout);
        }
    }
}

#[test]
fn version_is_the_crate_version_commit_and_features() {
    assert!(
        postern::COMMIT.len() == 12 && postern::COMMIT.bytes().all(|b| b.is_ascii_hexdigit()),
        "the tests are built in a git checkout, so the commit is known: {:?}",
        postern::COMMIT
    );
    for flag in ["--version", "-V"] {
        let out = run(&[flag], None, QUICK);
        assert!(out.status.success(), "{flag} failed: {}", out.stderr);
        // The tests build with the default features.
        assert_eq!(
            out.stdout,
            format!(
                "postern {} (commit {}; features: agent, station, tls, tls12, ntlm, ring)\n",
                env!("CARGO_PKG_VERSION"),
                postern::COMMIT
            )
        );
        assert_eq!(out.stderr, "");
    }
}

/// `postern SUB --help`, `postern -h SUB` and `postern help SUB` print that
/// command's help, which names its own options and the common ones.
#[test]
fn each_command_has_its_own_help() {
    let commands: [(&str, &str, &[&str]); 7] = [
        ("genkey", "Usage: postern genkey [-o FILE]\n", &["-o, --output FILE"]),
        ("pubkey", "Usage: postern pubkey < KEY\n", &["from stdin"]),
        ("station", "Usage: postern station -c FILE.toml\n", &["-c, --config", "SIGHUP"]),
        ("agent", "Usage: postern agent -c FILE.toml\n", &["-c, --config", "HTTP_PROXY"]),
        ("check", "Usage: postern check -c FILE.toml\n", &["-c, --config"]),
        ("status", "Usage: postern status -c FILE.toml\n", &["-c, --config", "/metrics"]),
        ("demo", "Usage: postern demo [--once]", &["--carrier KIND", "--bytes N"]),
    ];
    for (name, first_line, mentions) in commands {
        let out = run(&[name, "--help"], None, QUICK);
        assert!(out.status.success(), "{name} --help failed: {}", out.stderr);
        assert!(out.stdout.starts_with(first_line), "{name} --help:\n{}", out.stdout);
        for mention in mentions.iter().chain(&["-v, --verbose", "POSTERN_LOG"]) {
            assert!(out.stdout.contains(mention), "{name} --help lacks {mention:?}");
        }
        assert_eq!(run(&["-h", name], None, QUICK).stdout, out.stdout, "-h {name}");
        assert_eq!(run(&["help", name], None, QUICK).stdout, out.stdout, "help {name}");
    }
    assert_eq!(run(&["help"], None, QUICK).stdout, run(&["--help"], None, QUICK).stdout);
    let out = run(&["help", "frobnicate"], None, QUICK);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(out.stderr, "postern: unknown command \"frobnicate\"\nTry 'postern --help'.\n");
}

/// `genkey -o FILE` creates FILE with mode 0600 and never replaces one;
/// `genkey > FILE` warns, as `wg genkey` does, when FILE is world-readable.
#[test]
fn genkey_writes_private_files() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("genkey");
    let path = dir.path().join("device.key");
    let arg = path.to_str().expect("utf-8 path");
    let out = run(&["genkey", "-o", arg], None, QUICK);
    assert!(out.status.success(), "genkey -o failed: {}", out.stderr);
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("", ""));
    let meta = std::fs::metadata(&path).expect("genkey -o made the file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let written = std::fs::read_to_string(&path).expect("read the key");
    let key = written.strip_suffix('\n').expect("a line");
    PrivateKey::from_base64(key).unwrap_or_else(|e| panic!("genkey -o wrote a bad key: {e}"));

    let out = run(&["genkey", "--output", arg], None, QUICK);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        out.stderr,
        format!("postern: {arg} exists; genkey never replaces a key (remove the file first)\n")
    );
    assert_eq!(std::fs::read_to_string(&path).expect("read"), written, "the key was kept");

    let out = run(&["genkey", "-o", "/nonexistent-dir/k"], None, QUICK);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        out.stderr,
        "postern: cannot create /nonexistent-dir/k: No such file or directory (os error 2)\n"
    );
    let out = run(&["pubkey", "-o", arg], None, QUICK);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        out.stderr,
        "postern: -o applies only to genkey, not pubkey\nTry 'postern --help'.\n"
    );

    let warning = "postern: warning: writing a private key to a world-readable file; use \
                   umask 077 or postern genkey -o FILE\n";
    for (mode, stderr) in [(0o644, warning), (0o600, "")] {
        let printed = dir.path().join(format!("printed-{mode:o}.key"));
        let file = std::fs::File::create(&printed).expect("create");
        file.set_permissions(std::fs::Permissions::from_mode(mode)).expect("chmod");
        let out = std::process::Command::new(BIN)
            .arg("genkey")
            .stdout(file)
            .output()
            .expect("run postern genkey");
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stderr), stderr, "stdout mode {mode:o}");
        let key = std::fs::read_to_string(&printed).expect("read");
        PrivateKey::from_base64(key.trim_end()).expect("the printed key");
    }
}

#[test]
fn usage_errors_exit_2() {
    let cases: [(&[&str], &str); 4] = [
        (&[], "postern: no command given\nTry 'postern --help'.\n"),
        (&["frobnicate"], "postern: unknown command \"frobnicate\"\nTry 'postern --help'.\n"),
        (&["station"], "postern: station needs -c FILE.toml\nTry 'postern --help'.\n"),
        (&["check"], "postern: check needs -c FILE.toml\nTry 'postern --help'.\n"),
    ];
    for (args, stderr) in cases {
        let out = run(args, None, QUICK);
        assert_eq!(out.status.code(), Some(2), "postern {args:?}");
        assert_eq!(out.stderr, stderr, "postern {args:?}");
        assert_eq!(out.stdout, "", "postern {args:?}");
    }
}

#[test]
fn demo_once_verifies() {
    let out = run(&["demo", "--once"], None, DEMO);
    assert!(out.status.success(), "demo --once failed:\n{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("hash:     verified: every byte came back"),
        "demo did not report verified bytes:\n{}",
        out.stdout
    );
    let sent = format!("sent:     {} bytes", postern::demo::DEFAULT_BYTES);
    assert!(out.stdout.contains(&sent), "demo did not send its default size:\n{}", out.stdout);
}

/// A key that cannot be written (a full disk, a closed pipe) is an error
/// with the reason and exit 1, not a panic.
#[test]
fn genkey_to_a_full_disk_is_an_error_not_a_panic() {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("open /dev/full");
    let out = std::process::Command::new(BIN)
        .arg("genkey")
        .stdout(full)
        .output()
        .expect("run postern genkey");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr,
        "postern: cannot write the new key to stdout: No space left on device (os error 28)\n"
    );
}

/// Under systemd (JOURNAL_STREAM names stderr's device and inode) lines
/// start with their syslog priority and carry no timestamp, so that
/// `journalctl -p warning` finds the warnings. The test owns the pipe.
#[test]
fn journal_lines_carry_their_priority() {
    use std::io::{BufRead, BufReader};
    let dir = TempDir::new("journal");
    let keys = Keys::new();
    let config = dir.write(
        "agent.toml",
        &agent_toml(refused_addr(), &keys.station.public_key(), &keys.device, "poll", &["echo"]),
    );
    // journald hands a service a stream socket; the test owns the pair.
    let (reader, writer) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
    let stat = rustix::fs::fstat(&writer).expect("fstat the socket");
    #[allow(clippy::useless_conversion)]
    let stream = format!("{}:{}", u64::from(stat.st_dev), u64::from(stat.st_ino));
    let mut command = std::process::Command::new(BIN);
    command
        .args(["agent", "-c", config.to_str().expect("utf-8 path")])
        .env_remove("POSTERN_LOG")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env("JOURNAL_STREAM", stream)
        .stdout(std::process::Stdio::null())
        .stderr(std::os::fd::OwnedFd::from(writer));
    let agent = std::sync::Arc::new(std::sync::Mutex::new(command.spawn().expect("start")));
    // Our copy of the writing end goes with the command, so the read below
    // ends when the agent does; the agent ends at LOG_WAIT at the latest.
    drop(command);
    let watchdog = agent.clone();
    std::thread::spawn(move || {
        std::thread::sleep(LOG_WAIT);
        let _ = watchdog.lock().map(|mut agent| agent.kill());
    });
    let mut lines = Vec::new();
    for line in BufReader::new(reader).lines().map_while(Result::ok) {
        let warned = line.contains("cannot start a session");
        lines.push(line);
        if warned {
            break;
        }
    }
    if let Ok(mut agent) = agent.lock() {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    assert!(lines[0].starts_with("<6>INFO  postern::agent::forwards: forwarding "), "{lines:?}");
    let last = lines.last().expect("a line");
    assert!(last.starts_with("<4>WARN  postern::agent: cannot start a session"), "{lines:?}");
}
