//! Device builds, end to end: the agents `scripts/build-board` cross-built
//! run under qemu-user against a native station, and `scripts/install-image`
//! writes an ext4 image that is read back with debugfs.
//!
//! ```text
//!  test ─tcp─▶ agent (dist/BOARD/postern, qemu-user) ═HTTP═▶ station (native) ─tcp─▶ echo (test)
//!    ▲                                                                                 │
//!    └──────────────────────── the same bytes, hashed ◀───────────────────────────────┘
//! ```
//!
//! The board binaries take minutes to build, so they come from `dist/`:
//! `scripts/test` builds them, names the directory in `POSTERN_DIST` and
//! runs these tests with `--ignored`. They are ignored by default so a plain
//! `cargo test` stays quick and says they did not run; run without the
//! variable they fail with what to do, and a missing binary or tool is a
//! failure. Everything binds 127.0.0.1 on ephemeral ports and every wait
//! has a deadline.
//!
//! Serial lines are not run under emulation: Debian 12's qemu-user (7.2)
//! answers TCGETS2, which the serial endpoint uses, with ENOSYS ("Unsupported
//! ioctl: cmd=0x802c542a"), while any ARM kernel implements it. The serial
//! endpoint is tested natively by tests/serial.rs.
//!
//! `idle_rss` is a measurement, not a test: `scripts/bench-sizes` runs it
//! with a native agent-only build and records VmRSS, RssAnon, RssFile and
//! VmHWM from /proc/PID/status in docs/BENCHMARKS.md.
//!
//! Needs both features: the station under test is this crate's own binary.
#![cfg(all(feature = "agent", feature = "station"))]

mod common;
mod middleboxes;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    echo_within, start_agent_via, start_station, Digest, Keys, Pattern, Proc, Received, Server,
    TempDir, Tunnel,
};
use middleboxes::Middlebox;

/// Names the directory with one `BOARD/postern` per built board.
const DIST_VAR: &str = "POSTERN_DIST";

/// Names a native agent-only binary for `idle_rss`.
const AGENT_BIN_VAR: &str = "POSTERN_AGENT_BIN";

/// The boards whose architectures the round trips cover: Thumb-2 armv7
/// with glibc, and aarch64 with musl.
const ARMV7_BOARD: &str = "beaglebone-black";
const AARCH64_BOARD: &str = "raspberry-pi";

/// The board the full install is tried on: its binary is not in /usr/bin.
const GATEWAY_BOARD: &str = "imx8-gateway";

/// Bytes pushed through the emulated agent and back: as many as the demo
/// sends, many carrier requests and credit updates. Under qemu-user this
/// takes a few seconds here. Starting the processes, qemu translating the
/// agent included, is bounded by `common::LOG_WAIT`.
const ROUND_TRIP_BYTES: u64 = 8 << 20;

/// Seed of the pattern those bytes follow.
const ROUND_TRIP_SEED: u64 = 0x5eed;

/// How long the round trip may take under emulation (a generous multiple
/// of the few seconds it takes).
const TRANSFER_LIMIT: Duration = Duration::from_secs(120);

/// Part of what std's default panic hook prints (`thread 'main'
/// panicked at src/...`).
const PANIC_TEXT: &[u8] = b" panicked at ";

/// Image size for the install tests: the largest agent is under 1 MiB.
const IMAGE_BYTES: u64 = 16 << 20;

/// Highest `systemd-analyze security` exposure accepted for the unit with
/// install-image's drop-in (the issue's bound; docs/OPERATIONS.md has the scores).
const MAX_EXPOSURE: f64 = 2.0;

// ---------------------------------------------------------------------------
// Round trips through cross-built agents.

#[test]
#[ignore = "needs the board agents: scripts/test builds them and sets POSTERN_DIST"]
fn armv7_agent_under_qemu_carries_bytes_exactly() {
    round_trip_through_board(&dist_dir(), ARMV7_BOARD);
}

#[test]
#[ignore = "needs the board agents: scripts/test builds them and sets POSTERN_DIST"]
fn aarch64_agent_under_qemu_carries_bytes_exactly() {
    round_trip_through_board(&dist_dir(), AARCH64_BOARD);
}

fn round_trip_through_board(dist: &Path, board: &str) {
    board_binary(dist, board);
    let runner = script("board-run").display().to_string();
    let echo = Server::echo();
    let tunnel = start_tunnel(&[&runner, board], &echo);
    let back =
        echo_within(tunnel.forward("echo"), ROUND_TRIP_SEED, ROUND_TRIP_BYTES, TRANSFER_LIMIT);
    assert_eq!(
        back,
        Received::expected(ROUND_TRIP_SEED, ROUND_TRIP_BYTES),
        "{board}: bytes that came back through the agent (length, BLAKE2s, how it ended)\n{}",
        tunnel.describe()
    );
    assert_eq!(echo.accepts(), 1, "{board}: one stream carried it all");
}

/// Rebuilding std for the boards (boards/README.md, "Rebuilt std") must
/// drop only the backtrace symbolizer: a panic on a device still has to
/// say what panicked and where, and std's panic hook is what prints that.
/// `panic = "immediate-abort"` would remove the hook and this text with it.
#[test]
#[ignore = "needs the board agents: scripts/test builds them and sets POSTERN_DIST"]
fn board_agents_keep_panic_messages() {
    let dist = dist_dir();
    for board in [ARMV7_BOARD, AARCH64_BOARD, GATEWAY_BOARD] {
        let binary = std::fs::read(board_binary(&dist, board)).unwrap();
        assert!(
            binary.windows(PANIC_TEXT.len()).any(|w| w == PANIC_TEXT),
            "{board}: the agent has no panic message text ({:?}); was std built \
             without its panic hook?",
            String::from_utf8_lossy(PANIC_TEXT)
        );
    }
}

/// A native station and the agent `program` (`scripts/board-run BOARD`,
/// or a native binary) with one forward to `echo`, connected.
fn start_tunnel(program: &[&str], echo: &Server) -> Tunnel {
    Tunnel::start_via(program, "auto", &[("echo", echo.target())], &["echo"], &["echo"])
}

/// The board whose agent runs here without an emulator.
const NATIVE_BOARD: &str = "x86-64-pc";

/// Board agents leave NTLM out (cargo feature `ntlm`, boards/README.md).
/// Behind a proxy that offers nothing else, the agent must say what is
/// missing and knock rarely: not fail in silence, not storm the proxy.
#[test]
#[ignore = "needs the board agents: scripts/test builds them and sets POSTERN_DIST"]
fn a_board_agent_without_ntlm_says_so_behind_an_ntlm_only_proxy() {
    let binary = board_binary(&dist_dir(), NATIVE_BOARD);
    let program = binary.to_str().expect("utf-8 path");
    let squid = Middlebox::squid_ntlm("alice");
    let echo = Server::echo();
    let dir = TempDir::new("device-no-ntlm");
    let keys = Keys::new();
    let station_toml = keys.station_toml(&[("echo", echo.target())], "test-device", &["echo"]);
    let (_station, addr) = start_station(&dir, &station_toml);
    let proxy = format!("proxy = \"http://CORP%5Calice:secret@{}\"\n", squid.addr);
    let toml = keys.agent_toml(addr, &["echo"], "").replacen('\n', &format!("\n{proxy}"), 1);
    let (agent, _) = start_agent_via(&[program], &dir, "agent", &toml, &["echo"]);
    let line = agent.wait_log(&[
        "offers only NTLM authentication; this build of postern speaks Basic only (NTLM and \
         Negotiate are cargo feature `ntlm`)",
    ]);
    assert!(line.contains(&format!("the proxy {}", squid.addr)), "names the proxy: {line}");
    thread::sleep(Duration::from_secs(5));
    let log = agent.stderr.text();
    assert!(!log.contains("secret"), "the password was logged:\n{log}");
    let attempts = agent.stderr.count("offers only NTLM authentication");
    assert!((1..=8).contains(&attempts), "{attempts} attempts in 5 s:\n{}", agent.describe());
}

// ---------------------------------------------------------------------------
// Image installs.

#[test]
#[ignore = "needs the board agents: scripts/test builds them and sets POSTERN_DIST"]
fn install_image_writes_agent_config_key_and_unit() {
    let dist = dist_dir();
    let binary = board_binary(&dist, GATEWAY_BOARD);
    let dir = TempDir::new("device-install");
    let image = make_image(&dir);
    let keys = Keys::new();
    let agent_key = keys.device.to_base64();
    dir.write("agent.key", &agent_key);
    let config = format!(
        "station = \"http://station.example.com/postern/\"\n\
         station_public_key = \"{}\"\n\
         private_key_file = \"agent.key\"\n\
         [[forward]]\nlisten = \"127.0.0.1:5020\"\ntarget = \"collector\"\n\
         [[forward]]\nserial = \"/dev/ttymxc2\"\nbaud = 19200\ntarget = \"meter\"\n\
         [services]\nconsole = {{ serial = \"/dev/ttyUSB0\", baud = 115200 }}\n",
        keys.station.public_key().to_base64()
    );
    let config_path = dir.write("site-7.toml", &config);

    let out = install_image(&image, GATEWAY_BOARD, &config_path);
    assert!(out.status.success(), "install-image failed: {}", text(&out.stderr));

    let bin = image_file(&image, "/usr/local/bin/postern");
    assert_eq!((bin.mode, bin.uid, bin.gid), (0o100755, 0, 0), "/usr/local/bin/postern");
    assert_eq!(hash(&bin.content), hash(&std::fs::read(&binary).unwrap()), "installed binary");
    let cfg = image_file(&image, "/etc/postern/agent.toml");
    assert_eq!((cfg.mode, cfg.uid, cfg.gid), (0o100600, 0, 0), "/etc/postern/agent.toml");
    assert_eq!(cfg.content, config.as_bytes(), "installed config");
    let key = image_file(&image, "/etc/postern/agent.key");
    assert_eq!((key.mode, key.uid, key.gid), (0o100600, 0, 0), "/etc/postern/agent.key");
    assert_eq!(key.content, agent_key.as_bytes(), "installed key");
    let unit_file = image_file(&image, UNIT_PATH);
    assert_eq!(unit_file.mode, 0o100644, "unit mode");
    assert_eq!(
        String::from_utf8(unit_file.content).unwrap(),
        repo_unit(),
        "the unit is the packages' own"
    );
    let dropin_file = image_file(&image, DROPIN_PATH);
    assert_eq!(dropin_file.mode, 0o100644, "drop-in mode");
    let unit = String::from_utf8(dropin_file.content).unwrap();
    for line in [
        "ExecStart=",
        "ExecStart=/usr/local/bin/postern agent -c ${CREDENTIALS_DIRECTORY}/agent.toml",
        "LoadCredential=agent.toml:/etc/postern/agent.toml",
        "LoadCredential=agent.key:/etc/postern/agent.key",
        "DynamicUser=yes",
        "PrivateDevices=no",
        "DeviceAllow=/dev/ttymxc2 rw",
        "DeviceAllow=char-ttyUSB rw",
        "SupplementaryGroups=dialout",
    ] {
        assert_unit_has(&unit, line);
    }
    let allowed: Vec<&str> = unit.lines().filter(|l| l.starts_with("DeviceAllow=")).collect();
    assert_eq!(allowed.len(), 2, "DeviceAllow only for the config's serial lines: {allowed:?}");
    let link =
        image_stat(&image, "/etc/systemd/system/multi-user.target.wants/postern-agent.service");
    assert!(
        link.contains("Type: symlink")
            && link.contains("Fast link dest: \"/etc/systemd/system/postern-agent.service\""),
        "the unit is not enabled:\n{link}"
    );
    check_unit_with_systemd(&dir, &unit, 1.7);
}

#[test]
#[ignore = "needs the board agents: scripts/test builds them and sets POSTERN_DIST"]
fn install_image_without_serial_hides_devices() {
    let dist = dist_dir();
    board_binary(&dist, ARMV7_BOARD);
    let dir = TempDir::new("device-install-tcp");
    let image = make_image(&dir);
    let config = dir.write("agent.toml", &tcp_only_config(502));
    let out = install_image(&image, ARMV7_BOARD, &config);
    assert!(out.status.success(), "install-image failed: {}", text(&out.stderr));
    let unit = String::from_utf8(image_file(&image, DROPIN_PATH).content).unwrap();
    for line in [
        "ExecStart=/usr/bin/postern agent -c ${CREDENTIALS_DIRECTORY}/agent.toml",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    ] {
        assert_unit_has(&unit, line);
    }
    for absent in
        ["DeviceAllow=", "SupplementaryGroups=", "PrivateDevices=", "LoadCredential=agent.key"]
    {
        assert!(!unit.contains(absent), "drop-in has {absent:?} without a need:\n{unit}");
    }
    check_unit_with_systemd(&dir, &unit, 1.6);
    let bin = image_file(&image, "/usr/bin/postern");
    assert_eq!(bin.mode, 0o100755, "/usr/bin/postern mode");
}

#[test]
#[ignore = "needs the board agents: scripts/test builds them and sets POSTERN_DIST"]
fn install_image_refuses_bad_configs_and_leaves_the_image_alone() {
    let dist = dist_dir();
    board_binary(&dist, ARMV7_BOARD);
    let dir = TempDir::new("device-refuse");
    let image = make_image(&dir);
    let before = hash(&std::fs::read(&image).unwrap());
    let good = tcp_only_config(5020);
    let station_key = Keys::new().station.to_base64();
    let cases = [
        // (file, text, what the refusal must say)
        (
            "scheme.toml",
            good.replace("http://127.0.0.1:8080/", "ftp://127.0.0.1:8080/"),
            "scheme.toml: station: scheme \"ftp\" is not supported",
        ),
        (
            "typo.toml",
            good.replace("target =", "targte ="),
            "typo.toml: line 6, column 1: unknown field `targte`",
        ),
        (
            "abs-key.toml",
            good.replace(
                &good.lines().find(|l| l.starts_with("private_key ")).unwrap().to_owned(),
                "private_key_file = \"/etc/postern/agent.key\"",
            ),
            "private_key_file = '/etc/postern/agent.key': must be a file name next to the config",
        ),
        (
            "no-key.toml",
            good.replace(
                &good.lines().find(|l| l.starts_with("private_key ")).unwrap().to_owned(),
                "private_key_file = \"absent.key\"",
            ),
            "there is no readable",
        ),
        (
            "station.toml",
            format!("listen = \"127.0.0.1:8080\"\nprivate_key = \"{station_key}\"\n"),
            "not an agent config",
        ),
    ];
    for (name, text_in, reason) in cases {
        let config = dir.write(name, &text_in);
        let out = install_image(&image, ARMV7_BOARD, &config);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name} was not refused: {stderr}");
        assert!(stderr.contains("refused") && stderr.contains(reason), "{name}: {stderr}");
    }
    assert_eq!(
        hash(&std::fs::read(&image).unwrap()),
        before,
        "a refused install changed the image"
    );
}

fn assert_unit_has(unit: &str, line: &str) {
    assert!(unit.lines().any(|l| l == line), "unit lacks {line:?}:\n{unit}");
}

fn tcp_only_config(port: u16) -> String {
    let keys = Keys::new();
    format!(
        "station = \"http://127.0.0.1:8080/\"\n\
         station_public_key = \"{}\"\n\
         private_key = \"{}\"\n\
         [[forward]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"collector\"\n",
        keys.station.public_key().to_base64(),
        keys.device.to_base64()
    )
}

/// `systemd-analyze verify` finds no unknown or malformed setting in the
/// unit with `dropin`, and `systemd-analyze security` scores them no worse
/// than [`MAX_EXPOSURE`], and exactly `expected` (systemd 252): a setting
/// lost on the way to the image shows as a changed score.
fn check_unit_with_systemd(dir: &TempDir, dropin: &str, expected: f64) {
    // verify wants ExecStart to exist and be executable here.
    let exec = dir.write("postern", "");
    let mut perms = std::fs::metadata(&exec).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&exec, perms).unwrap();
    let local = |text: &str| {
        let exec = format!("ExecStart={} ", exec.display());
        text.replace("ExecStart=/usr/local/bin/postern ", &exec)
            .replace("ExecStart=/usr/bin/postern ", &exec)
    };
    // Both read the drop-ins in the directory beside the unit they are given.
    let unit_path = dir.write("postern-agent.service", &local(&repo_unit()));
    std::fs::create_dir_all(dir.path().join("postern-agent.service.d")).unwrap();
    dir.write("postern-agent.service.d/image.conf", &local(dropin));
    let out = run_tool(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no", "--generators=no"])
            .arg(&unit_path),
    );
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&out.stderr)
    );
    let out = run_tool(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&unit_path),
    );
    let report = text(&out.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for postern-agent.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}{}", text(&out.stderr)));
    assert!(exposure <= MAX_EXPOSURE, "unit exposure {exposure} > {MAX_EXPOSURE}:\n{report}");
    assert_eq!(exposure, expected, "unit exposure:\n{report}");
}

const UNIT_PATH: &str = "/etc/systemd/system/postern-agent.service";
const DROPIN_PATH: &str = "/etc/systemd/system/postern-agent.service.d/image.conf";

/// The unit the packages ship, which install-image installs as is.
fn repo_unit() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/systemd/postern-agent.service");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---------------------------------------------------------------------------
// Idle memory of the native agent (a measurement for scripts/bench-sizes).

#[test]
#[ignore = "a measurement: scripts/bench-sizes runs it with POSTERN_AGENT_BIN"]
fn idle_rss() {
    let agent = std::env::var(AGENT_BIN_VAR)
        .unwrap_or_else(|_| panic!("{AGENT_BIN_VAR} must name a native agent binary"));
    let target = Server::echo();
    let tunnel = start_tunnel(&[&agent], &target);
    print_memory(&tunnel.agent, "no-stream");
    let mut stream = TcpStream::connect(tunnel.forward("echo")).unwrap();
    stream.set_read_timeout(Some(TRANSFER_LIMIT)).unwrap();
    stream.set_write_timeout(Some(TRANSFER_LIMIT)).unwrap();
    let mut pattern = Pattern::new(7);
    let mut echo = |bytes: usize| {
        let mut block = vec![0u8; bytes];
        let mut echoed = vec![0u8; bytes];
        pattern.fill(&mut block);
        stream.write_all(&block).unwrap();
        stream.read_exact(&mut echoed).unwrap();
        assert_eq!(echoed, block, "echo through the native agent");
    };
    echo(16);
    print_memory(&tunnel.agent, "one-stream");
    // Buffers that fill only when bytes flow in bulk are counted too.
    for _ in 0..4 {
        echo(64 * 1024);
    }
    print_memory(&tunnel.agent, "one-stream-after-256KiB");
}

/// Prints `idle-rss STATE VmRSS=.. kB RssAnon=.. kB RssFile=.. kB VmHWM=.. kB`
/// for `scripts/bench-sizes`, once VmRSS has not changed for a second (or
/// after ten seconds, whichever is first).
fn print_memory(agent: &Proc, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = agent.memory();
    let mut stable_since = Instant::now();
    while Instant::now() < deadline && stable_since.elapsed() < Duration::from_secs(1) {
        thread::sleep(Duration::from_millis(100));
        let now = agent.memory();
        if now.now_kib != last.now_kib {
            stable_since = Instant::now();
        }
        last = now;
    }
    println!(
        "idle-rss {state} VmRSS={} kB RssAnon={} kB RssFile={} kB VmHWM={} kB",
        last.now_kib, last.anon_kib, last.file_kib, last.peak_kib
    );
}

// ---------------------------------------------------------------------------
// Helpers.

/// `dist/` as named by `scripts/test`; without it the test fails with
/// how to build the agents it needs.
fn dist_dir() -> PathBuf {
    let Some(dir) = std::env::var_os(DIST_VAR) else {
        panic!(
            "{DIST_VAR} is not set. scripts/test builds the board agents \
             (scripts/build-board) and sets it; to run these alone: \
             scripts/build-board {ARMV7_BOARD} && scripts/build-board {AARCH64_BOARD} && \
             scripts/build-board {GATEWAY_BOARD} && scripts/build-board {NATIVE_BOARD} && \
             {DIST_VAR}=$PWD/dist cargo test --release --test device -- --ignored --skip idle_rss"
        );
    };
    PathBuf::from(dir)
}

fn board_binary(dist: &Path, board: &str) -> PathBuf {
    let binary = dist.join(board).join("postern");
    assert!(
        binary.is_file(),
        "{} is missing: scripts/build-board {board} makes it",
        binary.display()
    );
    binary
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)
}

fn install_image(image: &Path, board: &str, config: &Path) -> Output {
    run_tool(Command::new(script("install-image")).arg(image).arg(board).arg(config))
}

/// Runs a tool (a script, debugfs, systemd-analyze) to completion.
fn run_tool(command: &mut Command) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .env("PATH", path_with_sbin())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// debugfs and mke2fs live in /sbin, which a non-root PATH may lack.
fn path_with_sbin() -> String {
    format!("{}:/usr/sbin:/sbin", std::env::var("PATH").unwrap_or_default())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn hash(bytes: &[u8]) -> String {
    let mut digest = Digest::default();
    digest.update(bytes);
    digest.finish()
}

/// A file read back out of an image with debugfs.
struct ImageFile {
    mode: u32,
    uid: u32,
    gid: u32,
    content: Vec<u8>,
}

fn image_stat(image: &Path, path: &str) -> String {
    let out = run_tool(Command::new("debugfs").arg("-R").arg(format!("stat {path}")).arg(image));
    text(&out.stdout)
}

fn image_file(image: &Path, path: &str) -> ImageFile {
    let stat = image_stat(image, path);
    let field = |name: &str| -> &str {
        stat.split(name)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("{path} is not in the image (no {name:?}):\n{stat}"))
    };
    assert!(stat.contains("Type: regular"), "{path} is not a regular file:\n{stat}");
    let permissions = u32::from_str_radix(field("Mode:"), 8).unwrap();
    let uid = field("User:").parse().unwrap();
    let gid = field("Group:").parse().unwrap();
    let out = run_tool(Command::new("debugfs").arg("-R").arg(format!("cat {path}")).arg(image));
    ImageFile { mode: 0o100000 | permissions, uid, gid, content: out.stdout }
}

/// An empty ext4 file system image of [`IMAGE_BYTES`] in `dir`.
fn make_image(dir: &TempDir) -> PathBuf {
    let image = dir.path().join("rootfs.ext4");
    std::fs::File::create(&image).unwrap().set_len(IMAGE_BYTES).unwrap();
    let out = run_tool(Command::new("mke2fs").args(["-q", "-F", "-t", "ext4"]).arg(&image));
    assert!(out.status.success(), "mke2fs: {}", text(&out.stderr));
    image
}
