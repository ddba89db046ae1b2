//! The Debian packages scripts/package builds, on this machine as an
//! operator would use them: lintian finds no error; the agent packages
//! carry the boards' own binaries and no station; `dpkg -i` makes the
//! `postern` user and a key per role; the installed units pass
//! `systemd-analyze verify` and `security`; the installed binary carries
//! bytes with the installed example configs, adjusted to loopback; an
//! upgrade keeps configs and keys, removal keeps the keys, purge deletes
//! them. The arm64 and armhf `postern` packages, which this amd64 machine
//! cannot install, hold what the amd64 one does and a binary for their
//! CPU with the station in it, which carries the same bytes under
//! qemu-user with the installed configs and keys.
//!
//! Ignored by default: it installs packages system-wide (as root).
//! scripts/test builds the packages twice, the second time as a newer
//! version, and sets POSTERN_PACKAGES and POSTERN_PACKAGES_NEXT to them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use postern::keys::PrivateKey;

/// Highest `systemd-analyze security` exposure accepted for a unit.
const MAX_EXPOSURE: f64 = 2.0;

/// Bytes sent through the installed station and agent.
const ROUND_TRIP_BYTES: u64 = 1 << 20;

const UNITS: [&str; 2] = ["postern-agent.service", "postern-station.service"];

/// The architectures of the packages, amd64 (this machine's) first.
const ARCHES: [&str; 3] = ["amd64", "arm64", "armhf"];

/// What the binary of an ARM `postern` package must be, and how it runs here.
struct Foreign {
    arch: &'static str,
    /// `readelf -h`'s `Machine:`.
    machine: &'static str,
    /// The dynamic loader it asks for; None: statically linked.
    interpreter: Option<&'static str>,
    /// qemu-user, with the armhf loader and libc from Debian's cross libc6.
    qemu: &'static [&'static str],
}

const FOREIGN: [Foreign; 2] = [
    Foreign {
        arch: "arm64",
        machine: "AArch64",
        interpreter: None,
        qemu: &["qemu-aarch64-static"],
    },
    Foreign {
        arch: "armhf",
        machine: "ARM",
        interpreter: Some("/lib/ld-linux-armhf.so.3"),
        qemu: &["qemu-arm-static", "-L", "/usr/arm-linux-gnueabihf"],
    },
];

fn packages_dir(var: &str) -> PathBuf {
    let dir = std::env::var_os(var)
        .unwrap_or_else(|| panic!("{var} is not set: scripts/test builds the packages"));
    PathBuf::from(dir)
}

/// The one package `name` for `arch` in `dir`.
fn deb(dir: &Path, name: &str, arch: &str) -> PathBuf {
    let (prefix, suffix) = (format!("{name}_"), format!("_{arch}.deb"));
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| {
            let file = path.file_name().and_then(|n| n.to_str());
            file.is_some_and(|n| n.starts_with(&prefix) && n.ends_with(&suffix))
        })
        .collect();
    assert_eq!(found.len(), 1, "one {prefix}*{suffix} in {}: {found:?}", dir.display());
    found.into_iter().next().expect("checked above")
}

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Runs a tool to completion; (success, stdout, stderr).
fn tool(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Runs a tool that must succeed; its stdout.
fn must(program: &str, args: &[&str]) -> String {
    let (ok, stdout, stderr) = tool(program, args);
    assert!(ok, "{program} {args:?} failed:\n{stdout}{stderr}");
    stdout
}

fn dpkg_install(deb: &Path) -> String {
    let path = deb.to_str().expect("utf-8 path");
    must("dpkg", &["--force-confdef", "--force-confold", "-i", path])
}

/// The installed version, or None when `package` is not installed.
fn installed(package: &str) -> Option<String> {
    let (ok, stdout, _) = tool("dpkg-query", &["-W", "-f=${Status} ${Version}", package]);
    let status = stdout.strip_prefix("install ok installed ")?;
    ok.then(|| status.to_owned())
}

/// (mode, owner, group) of an installed file.
fn stat(path: &str) -> (String, String, String) {
    let out = must("stat", &["-c", "%a %U %G", path]);
    let mut fields = out.split_whitespace().map(str::to_owned);
    let mut next = || fields.next().unwrap_or_default();
    (next(), next(), next())
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn key_at(path: &str) -> PrivateKey {
    PrivateKey::from_base64(read(path).trim_end())
        .unwrap_or_else(|e| panic!("{path} is not a key: {e}"))
}

/// Leaves no postern package behind, from this run or a failed earlier one.
fn purge_all() {
    for package in ["postern", "postern-agent"] {
        let (ok, stdout, stderr) = tool("dpkg", &["--purge", package]);
        assert!(ok, "dpkg --purge {package}:\n{stdout}{stderr}");
    }
}

#[test]
#[ignore = "installs packages system-wide: scripts/test builds them and sets POSTERN_PACKAGES"]
fn debian_packages_install_upgrade_remove_and_purge() {
    let dir = packages_dir("POSTERN_PACKAGES");
    let next_dir = packages_dir("POSTERN_PACKAGES_NEXT");
    let agents = ARCHES.map(|arch| deb(&dir, "postern-agent", arch));
    let fulls = ARCHES.map(|arch| deb(&dir, "postern", arch));
    let full = &fulls[0];
    let full_next = deb(&next_dir, "postern", "amd64");

    check_with_lintian(&agents, &fulls);
    check_contents(&agents, &fulls);
    let foreign: Vec<(&Foreign, TempDir)> =
        FOREIGN.iter().map(|arm| (arm, check_foreign_binary(&dir, arm))).collect();
    assert!(rustix::process::geteuid().is_root(), "dpkg -i needs root");

    purge_all();
    // The device package first: its own user, key and config.
    let out = dpkg_install(&agents[0]);
    assert!(
        out.contains("postern-agent.service is not enabled: edit /etc/postern/agent.toml"),
        "postinst says why the agent is not started:\n{out}"
    );
    must("getent", &["passwd", "postern"]);
    assert_eq!(stat("/etc/postern/agent.key"), ("600".into(), "postern".into(), "postern".into()));
    assert_eq!(stat("/etc/postern/agent.toml"), ("640".into(), "root".into(), "postern".into()));
    assert_eq!(read("/etc/postern/agent.toml"), repo_file("packaging/etc/agent.toml"));
    let device_key = key_at("/etc/postern/agent.key");
    let version = must("/usr/bin/postern", &["--version"]);
    assert!(
        version.ends_with("features: agent)\n"),
        "the device package has no station: {version}"
    );

    // The central package replaces it and keeps the device key.
    dpkg_install(full);
    assert_eq!(installed("postern-agent"), None, "postern replaced postern-agent");
    assert_eq!(key_at("/etc/postern/agent.key").to_base64(), device_key.to_base64());
    assert_eq!(
        stat("/etc/postern/station.key"),
        ("600".into(), "postern".into(), "postern".into())
    );
    for unit in UNITS {
        let path = format!("/lib/systemd/system/{unit}");
        assert_eq!(read(&path), repo_file(&format!("packaging/systemd/{unit}")), "{path}");
        check_unit(&path);
    }

    run_installed_configs(&device_key, &["/usr/bin/postern"]);
    // The ARM stations, under qemu-user, with the same configs and keys.
    for (arm, unpacked) in &foreign {
        let binary = unpacked.path().join("usr/bin/postern");
        let mut station = arm.qemu.to_vec();
        station.push(binary.to_str().expect("utf-8"));
        run_installed_configs(&device_key, &station);
    }

    // Upgrade: the admin's config and both keys stay.
    let station_key = read("/etc/postern/station.key");
    let mut edited = read("/etc/postern/station.toml");
    edited.push_str("# the admin's line\n");
    std::fs::write("/etc/postern/station.toml", &edited).expect("edit the config");
    dpkg_install(&full_next);
    let next_version = must("dpkg-deb", &["-f", full_next.to_str().expect("utf-8"), "Version"]);
    assert_eq!(installed("postern"), Some(next_version.trim().to_owned()), "upgraded");
    assert_eq!(read("/etc/postern/station.toml"), edited, "the upgrade kept the edited config");
    assert_eq!(read("/etc/postern/station.key"), station_key, "the upgrade kept the station key");
    assert_eq!(key_at("/etc/postern/agent.key").to_base64(), device_key.to_base64());

    // Removal keeps configs and keys; purge deletes them.
    must("dpkg", &["--remove", "postern"]);
    assert!(!Path::new("/usr/bin/postern").exists(), "removed: the binary is gone");
    assert_eq!(read("/etc/postern/station.key"), station_key, "removal kept the station key");
    assert_eq!(read("/etc/postern/station.toml"), edited, "removal kept the config");
    purge_all();
    assert!(!Path::new("/etc/postern").exists(), "purge left /etc/postern behind");
}

fn check_with_lintian(agents: &[PathBuf], fulls: &[PathBuf]) {
    let mut args = vec!["--tag-display-limit", "0"];
    args.extend(agents.iter().chain(fulls).map(|p| p.to_str().expect("utf-8")));
    let (ok, stdout, stderr) = tool("lintian", &args);
    let errors: Vec<&str> = stdout.lines().filter(|l| l.starts_with("E: ")).collect();
    assert!(ok && errors.is_empty(), "lintian found errors:\n{stdout}{stderr}");
}

fn unpack(deb: &Path) -> TempDir {
    let unpacked = TempDir::new("deb");
    must(
        "dpkg-deb",
        &["-x", deb.to_str().expect("utf-8"), unpacked.path().to_str().expect("utf-8")],
    );
    unpacked
}

/// The man page help2man made from the package's own binary (under
/// qemu-user for ARM): its commands' sections and their options.
fn check_man_page(deb: &Path, unpacked: &TempDir, commands: &[&str]) {
    let man = must(
        "zcat",
        &[unpacked.path().join("usr/share/man/man1/postern.1.gz").to_str().expect("utf-8")],
    );
    for command in commands {
        assert!(man.contains(&format!(".SS {command}\n")), "man page of {}:\n{man}", deb.display());
    }
    assert!(man.contains("\\-o, \\-\\-output FILE"), "man page of {}:\n{man}", deb.display());
}

/// The agent packages hold the boards' binaries, the same unit file as
/// install-image, and no station unit; postern, for each architecture,
/// holds both units, the monitoring examples and the same conffiles.
fn check_contents(agents: &[PathBuf; 3], fulls: &[PathBuf; 3]) {
    let dist =
        PathBuf::from(std::env::var_os("POSTERN_DIST").expect("POSTERN_DIST: the board builds"));
    let boards = ["x86-64-pc", "raspberry-pi", "beaglebone-black"];
    for (deb, board) in agents.iter().zip(boards) {
        let files = must("dpkg-deb", &["-c", deb.to_str().expect("utf-8")]);
        for path in [
            "./usr/bin/postern",
            "./lib/systemd/system/postern-agent.service",
            "./etc/postern/agent.toml",
            "./etc/default/postern-agent",
            "./usr/share/man/man1/postern.1.gz",
            "./usr/share/doc/postern-agent/copyright",
        ] {
            assert!(files.contains(path), "{} lacks {path}:\n{files}", deb.display());
        }
        assert!(!files.contains("postern-station"), "{} carries the station", deb.display());
        let unpacked = unpack(deb);
        let packaged = std::fs::read(unpacked.path().join("usr/bin/postern")).expect("read");
        let built = std::fs::read(dist.join(board).join("postern")).expect("the board build");
        assert!(packaged == built, "{} does not hold dist/{board}/postern", deb.display());
        check_man_page(deb, &unpacked, &["agent", "genkey"]);
    }
    for (deb, arch) in fulls.iter().zip(ARCHES) {
        let path = deb.to_str().expect("utf-8");
        assert_eq!(must("dpkg-deb", &["-f", path, "Architecture"]), format!("{arch}\n"));
        let files = must("dpkg-deb", &["-c", path]);
        for wanted in UNITS.map(|unit| format!("./lib/systemd/system/{unit}")).into_iter().chain([
            "./usr/bin/postern".to_owned(),
            "./usr/share/doc/postern/examples/postern.rules.yml".to_owned(),
            "./usr/share/doc/postern/examples/grafana-fleet.json".to_owned(),
        ]) {
            assert!(files.contains(&wanted), "{path} lacks {wanted}");
        }
        let conffiles = must("dpkg-deb", &["-I", path, "conffiles"]);
        assert_eq!(
            conffiles,
            "/etc/postern/station.toml\n/etc/default/postern-station\n/etc/postern/agent.toml\n/etc/default/postern-agent\n",
            "{path}"
        );
        let unpacked = unpack(deb);
        for unit in UNITS {
            let packaged =
                std::fs::read_to_string(unpacked.path().join("lib/systemd/system").join(unit));
            assert_eq!(
                packaged.expect("read"),
                repo_file(&format!("packaging/systemd/{unit}")),
                "{path}: {unit}"
            );
        }
        check_man_page(deb, &unpacked, &["agent", "station", "genkey"]);
    }
}

/// The ARM `postern` package's binary is for its CPU, linked as its board
/// build is, and is the full build of this commit: `--version` under
/// qemu-user names the station. Returns the package unpacked.
fn check_foreign_binary(dir: &Path, arm: &Foreign) -> TempDir {
    let deb = deb(dir, "postern", arm.arch);
    let unpacked = unpack(&deb);
    let binary = unpacked.path().join("usr/bin/postern");
    let binary = binary.to_str().expect("utf-8");
    let header = must("readelf", &["-h", binary]);
    let machine = header.lines().find_map(|l| l.trim().strip_prefix("Machine:"));
    assert_eq!(machine.map(str::trim), Some(arm.machine), "{}: {header}", deb.display());
    let program_headers = must("readelf", &["-l", binary]);
    let interpreter = program_headers
        .lines()
        .find_map(|l| l.split("[Requesting program interpreter: ").nth(1))
        .and_then(|rest| rest.strip_suffix(']'));
    assert_eq!(interpreter, arm.interpreter, "{}: {program_headers}", deb.display());
    let (qemu, args) = arm.qemu.split_first().expect("an emulator");
    let mut version_args = args.to_vec();
    version_args.extend([binary, "--version"]);
    assert_eq!(
        must(qemu, &version_args),
        format!(
            "postern {} (commit {}; features: agent, station, tls, tls12, ntlm, ring)\n",
            env!("CARGO_PKG_VERSION"),
            postern::COMMIT
        ),
        "{}",
        deb.display()
    );
    unpacked
}

/// `systemd-analyze verify` finds nothing wrong with the installed unit and
/// `security` scores it no worse than [`MAX_EXPOSURE`].
fn check_unit(path: &str) {
    let (ok, stdout, stderr) =
        tool("systemd-analyze", &["verify", "--man=no", "--generators=no", path]);
    assert!(ok && stderr.is_empty(), "systemd-analyze verify {path}:\n{stdout}{stderr}");
    let (_, report, stderr) =
        tool("systemd-analyze", &["security", "--offline=true", "--no-pager", path]);
    let name = path.rsplit('/').next().expect("a file name");
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split(&format!("Overall exposure level for {name}: ")).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}{stderr}"));
    assert!(exposure <= MAX_EXPOSURE, "{name} exposure {exposure} > {MAX_EXPOSURE}:\n{report}");
}

/// The installed keys and example configs, moved to loopback, with the
/// station `station` (the installed binary, or an ARM one under qemu-user)
/// and the installed agent: an echo through the tunnel comes back byte for
/// byte.
fn run_installed_configs(device_key: &PrivateKey, station: &[&str]) {
    let echo = Server::echo();
    let dir = TempDir::new("installed");
    let station_key = key_at("/etc/postern/station.key");
    let station_toml = read("/etc/postern/station.toml")
        .replace("listen = \"0.0.0.0:8080\"", "listen = \"127.0.0.1:0\"")
        .replace("status = \"127.0.0.1:9090\"", "status = \"127.0.0.1:0\"")
        .replace(
            "private_key_file = \"station.key\"",
            "private_key_file = \"/etc/postern/station.key\"",
        )
        .replace("[targets]\n", &format!("[targets]\necho = \"{}\"\n", echo.target()))
        + &format!(
            "[[devices]]\nname = \"installed\"\npublic_key = \"{}\"\nallow = [\"echo\"]\n",
            device_key.public_key().to_base64()
        );
    let path = dir.write("station.toml", &station_toml);
    let installed = ["/usr/bin/postern"];
    let station = Proc::spawn_via(
        station,
        "station",
        &["station", "-c", path.to_str().expect("utf-8")],
        None,
    );
    let line = station.wait_log(&["station listening on ", "(HTTP carrier)"]);
    let addr = addr_after(&line, "station listening on ").expect("an address");
    let agent_toml = read("/etc/postern/agent.toml")
        .replace("http://station.example.com:8080/", &format!("http://{addr}/"))
        .replace("REPLACE_WITH_THE_STATION_PUBLIC_KEY", &station_key.public_key().to_base64())
        .replace(
            "private_key_file = \"agent.key\"",
            "private_key_file = \"/etc/postern/agent.key\"",
        )
        + "[[forward]]\nlisten = \"127.0.0.1:0\"\ntarget = \"echo\"\n";
    let (agent, forwards) = start_agent_via(&installed, &dir, "agent", &agent_toml, &["echo"]);
    agent.wait_log(&["connected to the station"]);
    assert_eq!(
        echo_round_trip(forwards["echo"], 17, ROUND_TRIP_BYTES),
        Received::expected(17, ROUND_TRIP_BYTES),
        "through the installed binary and configs\n{}\n{}",
        agent.describe(),
        station.describe()
    );
}
