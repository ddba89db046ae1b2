//! Real proxies and load balancers, started on loopback for one test each:
//! squid, tinyproxy, privoxy and Apache httpd as forward proxies, nginx,
//! Apache httpd and varnish as reverse proxies, haproxy as a load balancer,
//! redis-server as the cluster's registry. Each runs in the foreground with a config in
//! its own temp dir and is killed when its guard drops.
//!
//! Their settings are the stock ones except where a test says otherwise;
//! timeouts are shortened (a few seconds) so that "idle for longer than the
//! middlebox's timeouts" fits in a test. The benchmark driver
//! (benches/throughput/) includes this file too and starts squid and nginx
//! with their stock timeouts (`squid_with`, `nginx_with`).
#![allow(dead_code)]

pub(crate) mod pki;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{refused_addr, TempDir};

/// A loopback port free right now, for programs that cannot bind port 0
/// and report the port they got.
fn free_port() -> u16 {
    refused_addr().port()
}

/// Longest a middlebox may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(30);

/// Idle and read timeouts given to every middlebox, in seconds: short, so
/// that a test can stay idle for longer than any of them.
pub(crate) const SHORT_TIMEOUT_SECS: u64 = 4;

/// A running middlebox, killed on drop.
pub(crate) struct Middlebox {
    pub name: &'static str,
    /// Where clients (the agent) connect.
    pub addr: SocketAddr,
    child: Child,
    dir: TempDir,
}

impl Middlebox {
    /// How many lines of the middlebox's logs contain `needle`.
    pub(crate) fn log_count(&self, needle: &str) -> usize {
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else { return 0 };
        entries
            .flatten()
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "log"))
            .map(|entry| std::fs::read_to_string(entry.path()).unwrap_or_default())
            .map(|body| body.lines().filter(|line| line.contains(needle)).count())
            .sum()
    }

    /// The middlebox's own logs, for failure messages.
    pub(crate) fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let body = std::fs::read_to_string(&path).unwrap_or_default();
                    let tail: Vec<&str> = body.lines().rev().take(40).collect();
                    text.push_str(&format!("--- {} {} ---\n", self.name, path.display()));
                    for line in tail.into_iter().rev() {
                        text.push_str(line);
                        text.push('\n');
                    }
                }
            }
        }
        text
    }

    /// Squid as a forward proxy that refuses CONNECT, optionally requiring
    /// Basic authentication of `user`/`password`.
    pub(crate) fn squid(auth: Option<(&str, &str)>) -> Middlebox {
        Self::squid_with(auth, Some(SHORT_TIMEOUT_SECS))
    }

    /// As [`Middlebox::squid`], with idle and read timeouts of `timeout`
    /// seconds, or squid's own (15 minutes to read, 1 to 2 idle) if `None`.
    pub(crate) fn squid_with(auth: Option<(&str, &str)>, timeout: Option<u64>) -> Middlebox {
        Self::squid_configured(auth, "", timeout)
    }

    /// As [`Middlebox::squid_with`], with `extra` lines in squid.conf (e.g.
    /// `request_body_max_size 1 MB`).
    pub(crate) fn squid_configured(
        auth: Option<(&str, &str)>,
        extra: &str,
        timeout: Option<u64>,
    ) -> Middlebox {
        let dir = shared_dir("squid");
        let auth_lines = match auth {
            Some((user, password)) => {
                let hash = openssl_apr1(password);
                let file = dir.write("passwd", &format!("{user}:{hash}\n"));
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))
                    .expect("chmod passwd");
                format!(
                    "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n\
                     auth_param basic realm postern-test\n\
                     acl users proxy_auth REQUIRED\n\
                     http_access deny !users\n",
                    file.display()
                )
            }
            None => String::new(),
        };
        let access = format!(
            "acl CONNECT method CONNECT\n\
             http_access deny CONNECT\n\
             {auth_lines}\
             http_access allow localhost\n\
             {extra}"
        );
        Self::squid_serving(dir, &access, timeout)
    }

    /// Squid refusing (403) the requests of a client that holds more than
    /// `max` connections to it (the `maxconn` ACL), as proxies that ration
    /// their clients do.
    pub(crate) fn squid_limiting_connections(max: usize) -> Middlebox {
        let access = format!(
            "acl CONNECT method CONNECT\n\
             http_access deny CONNECT\n\
             acl crowded maxconn {max}\n\
             http_access deny crowded\n\
             http_access allow localhost\n"
        );
        Self::squid_serving(shared_dir("squid"), &access, Some(SHORT_TIMEOUT_SECS))
    }

    /// Squid as the proxy of a site whose egress is HTTPS only: CONNECT to
    /// `tls_port` alone, and every plain (absolute-form) request refused.
    pub(crate) fn squid_connect_only(tls_port: u16) -> Middlebox {
        let access = format!(
            "acl CONNECT method CONNECT\n\
             acl tls_port port {tls_port}\n\
             http_access allow CONNECT tls_port localhost\n"
        );
        Self::squid_serving(shared_dir("squid"), &access, Some(SHORT_TIMEOUT_SECS))
    }

    /// Squid requiring NTLM (squid's `ntlm_fake_auth` runs the real
    /// three-message handshake and accepts any password), letting in only
    /// `user`: any other user gets a 407, as a wrong password would.
    /// CONNECT is allowed to any port, plain requests too.
    pub(crate) fn squid_ntlm(user: &str) -> Middlebox {
        let auth = "auth_param ntlm program /usr/lib/squid/ntlm_fake_auth -S\n\
                    auth_param ntlm children 2\n";
        Self::squid_authenticating(auth, user)
    }

    /// Squid offering only Negotiate, as an Active Directory site's proxy
    /// does: squid's `negotiate_wrapper_auth` hands NTLM tokens to
    /// `ntlm_fake_auth` (as [`Middlebox::squid_ntlm`]) and Kerberos ones to
    /// the Kerberos helper, which has no keytab here and refuses them.
    pub(crate) fn squid_negotiate(user: &str) -> Middlebox {
        let auth = "auth_param negotiate program /usr/lib/squid/negotiate_wrapper_auth \
                    --ntlm /usr/lib/squid/ntlm_fake_auth -S \
                    --kerberos /usr/lib/squid/negotiate_kerberos_auth -s GSS_C_NO_NAME\n\
                    auth_param negotiate children 2\n";
        Self::squid_authenticating(auth, user)
    }

    /// Squid with the `auth` helper lines, letting in only `user`.
    fn squid_authenticating(auth: &str, user: &str) -> Middlebox {
        let access = format!(
            "{auth}\
             acl users proxy_auth {user}\n\
             http_access deny !users\n\
             http_access allow localhost\n"
        );
        Self::squid_serving(shared_dir("squid"), &access, Some(SHORT_TIMEOUT_SECS))
    }

    /// Squid built with OpenSSL (`root`: Debian's squid-openssl package
    /// unpacked, see scripts/test) intercepting TLS: it answers CONNECT,
    /// lets the requests inside through, bumps the TLS inside with certificates it makes with `bump_ca`
    /// (certificate and key files), and trusts `upstream_ca` for the
    /// station's own certificate.
    pub(crate) fn squid_bump(
        root: &std::path::Path,
        bump_ca: &pki::Cert,
        upstream_ca: &std::path::Path,
    ) -> Middlebox {
        let dir = shared_dir("squid-bump");
        let certgen = root.join("usr/lib/squid/security_file_certgen");
        let db = dir.path().join("ssl_db");
        let out = Command::new(&certgen)
            .args(["-c", "-s", db.to_str().expect("utf-8 path"), "-M", "4MB"])
            .output()
            .expect("run security_file_certgen");
        assert!(out.status.success(), "security_file_certgen -c: {out:?}");
        let _ = Command::new("chown").args(["-R", "proxy:proxy"]).arg(&db).status();
        let access = format!(
            "acl CONNECT method CONNECT\n\
             http_access allow localhost\n\
             sslcrtd_program {} -s {} -M 4MB\n\
             acl step1 at_step SslBump1\n\
             acl step2 at_step SslBump2\n\
             ssl_bump peek step1\n\
             ssl_bump stare step2\n\
             ssl_bump bump all\n\
             tls_outgoing_options cafile={}\n",
            certgen.display(),
            db.display(),
            upstream_ca.display()
        );
        let port_options = format!(
            " ssl-bump generate-host-certificates=on tls-cert={} tls-key={}",
            bump_ca.cert.display(),
            bump_ca.key.display()
        );
        let binary = root.join("usr/sbin/squid");
        Self::squid_run(
            binary.to_str().expect("utf-8 path"),
            dir,
            &access,
            Some(SHORT_TIMEOUT_SECS),
            &port_options,
        )
    }

    /// Squid with `access` as its http_access rules (anything else denied).
    fn squid_serving(dir: TempDir, access: &str, timeout: Option<u64>) -> Middlebox {
        Self::squid_run("squid", dir, access, timeout, "")
    }

    fn squid_run(
        program: &str,
        dir: TempDir,
        access: &str,
        timeout: Option<u64>,
        port_options: &str,
    ) -> Middlebox {
        let port = free_port();
        let d = dir.path().display();
        let timeouts = timeout.map_or(String::new(), |t| {
            format!(
                "read_timeout {t} seconds\n\
                 client_idle_pconn_timeout {t} seconds\n\
                 server_idle_pconn_timeout {t} seconds\n"
            )
        });
        let conf = format!(
            "http_port 127.0.0.1:{port}{port_options}\n\
             {access}\
             http_access deny all\n\
             cache deny all\n\
             {timeouts}\
             pid_filename {d}/squid.pid\n\
             cache_log {d}/cache.log\n\
             access_log {d}/access.log\n\
             coredump_dir {d}\n\
             shutdown_lifetime 0 seconds\n"
        );
        let path = dir.write("squid.conf", &conf);
        let child = spawn(program, &["-N", "-f", path.to_str().expect("utf-8 path")], &dir);
        Self::started("squid", port, child, dir)
    }

    /// tinyproxy as a forward proxy (it allows CONNECT only to 443 and 563).
    pub(crate) fn tinyproxy() -> Middlebox {
        let dir = shared_dir("tinyproxy");
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\n\
             Timeout {SHORT_TIMEOUT_SECS}\nMaxClients 100\nAllow 127.0.0.1\n\
             LogFile \"{d}/tinyproxy.log\"\nLogLevel Info\nPidFile \"{d}/tinyproxy.pid\"\n"
        );
        let path = dir.write("tinyproxy.conf", &conf);
        let child = spawn("tinyproxy", &["-d", "-c", path.to_str().expect("utf-8 path")], &dir);
        Self::started("tinyproxy", port, child, dir)
    }

    /// nginx as a reverse proxy with its stock proxy settings (request and
    /// response buffering on, HTTP/1.0 upstream, 1 MiB body limit), serving
    /// the station under `prefix` (e.g. `/tunnel/`). `extra` goes into the
    /// location block, to change one setting for a test.
    pub(crate) fn nginx(station: SocketAddr, prefix: &str, extra: &str) -> Middlebox {
        Self::nginx_with(station, prefix, extra, Some(SHORT_TIMEOUT_SECS))
    }

    /// As [`Middlebox::nginx`], with client, keepalive and proxy timeouts of
    /// `timeout` seconds, or nginx's own (60 s, keepalive 75 s) if `None`.
    pub(crate) fn nginx_with(
        station: SocketAddr,
        prefix: &str,
        extra: &str,
        timeout: Option<u64>,
    ) -> Middlebox {
        Self::nginx_serving(station, prefix, extra, timeout, None)
    }

    /// As [`Middlebox::nginx_with`], terminating TLS with `tls`
    /// (certificate and key files) and proxying plain HTTP to the station.
    pub(crate) fn nginx_tls(
        station: SocketAddr,
        prefix: &str,
        extra: &str,
        tls: &pki::Cert,
        timeout: Option<u64>,
    ) -> Middlebox {
        Self::nginx_serving(station, prefix, extra, timeout, Some(tls))
    }

    fn nginx_serving(
        station: SocketAddr,
        prefix: &str,
        extra: &str,
        timeout: Option<u64>,
        tls: Option<&pki::Cert>,
    ) -> Middlebox {
        let dir = shared_dir("nginx");
        let port = free_port();
        let d = dir.path().display();
        let (server_timeouts, proxy_timeouts) =
            timeout.map_or((String::new(), String::new()), |t| {
                (
                    format!("keepalive_timeout {t}s; client_body_timeout {t}s; send_timeout {t}s;"),
                    format!("proxy_read_timeout {t}s; proxy_send_timeout {t}s;"),
                )
            });
        let (ssl, certs) = match tls {
            Some(files) => (
                " ssl",
                format!(
                    "ssl_certificate {}; ssl_certificate_key {};",
                    files.cert.display(),
                    files.key.display()
                ),
            ),
            None => ("", String::new()),
        };
        let conf = format!(
            "worker_processes 1;\ndaemon off;\nerror_log {d}/error.log info;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
               access_log {d}/access.log;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               {server_timeouts}\n\
               server {{\n\
                 listen 127.0.0.1:{port}{ssl};\n\
                 {certs}\n\
                 location {prefix} {{\n\
                   proxy_pass http://{station}/;\n\
                   {proxy_timeouts}\n\
                   {extra}\n\
                 }}\n\
               }}\n\
             }}\n"
        );
        let path = dir.write("nginx.conf", &conf);
        let child = spawn("nginx", &["-c", path.to_str().expect("utf-8 path")], &dir);
        Self::started("nginx", port, child, dir)
    }

    /// haproxy balancing round-robin over `stations`, sticky by an inserted
    /// cookie, with short client and server timeouts.
    pub(crate) fn haproxy(stations: &[SocketAddr]) -> Middlebox {
        let t = SHORT_TIMEOUT_SECS;
        let backend = "  cookie SRV insert indirect nocache\n";
        Self::haproxy_serving(stations, t, 256, "", backend, |i| format!("cookie s{i}"))
    }

    /// haproxy in `mode http` with its default options and `timeout_secs`
    /// timeouts in front of one station.
    pub(crate) fn haproxy_plain(station: SocketAddr, timeout_secs: u64) -> Middlebox {
        Self::haproxy_serving(&[station], timeout_secs, 256, "", "", |_| String::new())
    }

    /// haproxy balancing round-robin over `stations` with no stickiness at
    /// all, as cloud balancers and Kubernetes Services do by default: each
    /// request may reach any station. A health check every half second
    /// takes a dead station out, and a request it refused is sent to another.
    pub(crate) fn haproxy_round_robin(stations: &[SocketAddr], timeout_secs: u64) -> Middlebox {
        Self::haproxy_round_robin_for(stations, timeout_secs, 256, "")
    }

    /// As [`Middlebox::haproxy_round_robin`], for `maxconn` connections
    /// at once (a fleet's), with `defaults` lines added.
    pub(crate) fn haproxy_round_robin_for(
        stations: &[SocketAddr],
        timeout_secs: u64,
        maxconn: usize,
        defaults: &str,
    ) -> Middlebox {
        let defaults = format!("  option redispatch\n  retries 2\n{defaults}");
        let check = |_| "check inter 500ms fall 1 rise 1".to_owned();
        Self::haproxy_serving(stations, timeout_secs, maxconn, &defaults, "", check)
    }

    /// haproxy sending every session's `hello` to `hello` and its other
    /// carrier requests to `rest`: with two stations of a cluster, every
    /// request but the first is forwarded by `rest` to `hello`, the holder.
    pub(crate) fn haproxy_split(hello: SocketAddr, rest: SocketAddr) -> Middlebox {
        let backend =
            "  acl hello path_end /hello\n  use-server s0 if hello\n  use-server s1 if !hello\n";
        // As README.md asks of haproxy in front of stations: without it,
        // haproxy holds the stream carrier's small writes back.
        let defaults = "  option http-no-delay\n";
        Self::haproxy_serving(&[hello, rest], 60, 256, defaults, backend, |_| String::new())
    }

    /// haproxy in `mode http` over `stations` with `timeout_secs` client and
    /// server timeouts, `maxconn` connections at once, the lines `defaults`
    /// and `backend` added to those sections, and `server(i)` after each
    /// server's address.
    fn haproxy_serving(
        stations: &[SocketAddr],
        timeout_secs: u64,
        maxconn: usize,
        defaults: &str,
        backend: &str,
        server: impl Fn(usize) -> String,
    ) -> Middlebox {
        let dir = shared_dir("haproxy");
        let port = free_port();
        let t = timeout_secs;
        let mut conf = format!(
            "global\n  maxconn {maxconn}\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client {t}s\n\
               timeout server {t}s\n  timeout http-request {t}s\n{defaults}\
             frontend carrier\n  bind 127.0.0.1:{port}\n  default_backend stations\n\
             backend stations\n  balance roundrobin\n{backend}"
        );
        for (i, station) in stations.iter().enumerate() {
            conf.push_str(&format!("  server s{i} {station} {}\n", server(i)));
        }
        let path = dir.write("haproxy.cfg", &conf);
        let child = spawn("haproxy", &["-db", "-f", path.to_str().expect("utf-8 path")], &dir);
        Self::started("haproxy", port, child, dir)
    }

    /// redis-server on a free loopback port, keeping nothing on disk.
    pub(crate) fn redis() -> Middlebox {
        Self::redis_on(free_port())
    }

    /// As [`Middlebox::redis`] on `port`: a store restarted where its
    /// clients expect it, empty.
    pub(crate) fn redis_on(port: u16) -> Middlebox {
        let dir = shared_dir("redis");
        let port_text = port.to_string();
        let args = [
            "--port",
            &port_text,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            "redis.log",
            "--daemonize",
            "no",
        ];
        let child = spawn("redis-server", &args, &dir);
        Self::started("redis", port, child, dir)
    }

    /// Apache httpd (event MPM, mod_proxy_http) with `KeepAliveTimeout 5`
    /// as in the issue that found idle connections closed under the agent:
    /// a reverse proxy serving `station` under `prefix`, or, with `station`
    /// `None`, a forward proxy (`ProxyRequests On`, no CONNECT).
    pub(crate) fn apache(station: Option<SocketAddr>, prefix: &str) -> Middlebox {
        let dir = shared_dir("apache");
        let port = free_port();
        let d = dir.path().display();
        let modules = "/usr/lib/apache2/modules";
        let role = match station {
            Some(station) => format!(
                "ProxyPass \"{prefix}\" \"http://{station}/\"\n\
                 ProxyPassReverse \"{prefix}\" \"http://{station}/\"\n"
            ),
            None => {
                "ProxyRequests On\n<Proxy \"*\">\n  Require ip 127.0.0.1\n</Proxy>\n".to_owned()
            }
        };
        let conf = format!(
            "ServerRoot \"{d}\"\nServerName localhost\nListen 127.0.0.1:{port}\n\
             PidFile \"{d}/httpd.pid\"\nErrorLog \"{d}/error.log\"\nLogLevel warn\n\
             User www-data\nGroup www-data\n\
             LoadModule mpm_event_module {modules}/mod_mpm_event.so\n\
             LoadModule authz_core_module {modules}/mod_authz_core.so\n\
             LoadModule authz_host_module {modules}/mod_authz_host.so\n\
             LoadModule proxy_module {modules}/mod_proxy.so\n\
             LoadModule proxy_http_module {modules}/mod_proxy_http.so\n\
             CustomLog \"{d}/access.log\" \"%h %r %>s %b %D\"\n\
             KeepAlive On\nKeepAliveTimeout 5\nTimeout {SHORT_TIMEOUT_SECS}\n\
             {role}"
        );
        let path = dir.write("httpd.conf", &conf);
        let child =
            spawn("apache2", &["-DFOREGROUND", "-f", path.to_str().expect("utf-8 path")], &dir);
        Self::started("apache", port, child, dir)
    }

    /// privoxy as a forward proxy with Debian's stock timeouts (it closes
    /// connections idle for 5 s; no action or filter files).
    pub(crate) fn privoxy() -> Middlebox {
        let dir = shared_dir("privoxy");
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "listen-address 127.0.0.1:{port}\nconfdir {d}\nlogdir {d}\nlogfile privoxy.log\n\
             keep-alive-timeout 5\nsocket-timeout 300\ndebug 1\ndebug 4096\n"
        );
        let path = dir.write("privoxy.conf", &conf);
        let child = spawn("privoxy", &["--no-daemon", path.to_str().expect("utf-8 path")], &dir);
        Self::started("privoxy", port, child, dir)
    }

    /// varnish with its built-in VCL in front of `station` (POSTs are
    /// passed, not cached), in a work directory of its own.
    pub(crate) fn varnish(station: SocketAddr) -> Middlebox {
        let dir = shared_dir("varnish");
        let port = free_port();
        let work = dir.path().join("work");
        let child = spawn(
            "varnishd",
            &[
                "-F",
                "-j",
                "none",
                "-a",
                &format!("127.0.0.1:{port}"),
                "-b",
                &station.to_string(),
                "-n",
                work.to_str().expect("utf-8 path"),
                "-s",
                "malloc,32m",
                "-T",
                "none",
            ],
            &dir,
        );
        Self::started("varnish", port, child, dir)
    }

    fn started(name: &'static str, port: u16, mut child: Child, dir: TempDir) -> Middlebox {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + START_LIMIT;
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let logs = Middlebox { name, addr, child, dir }.logs();
                panic!("{name} exited with {status} before listening on {addr}:\n{logs}");
            }
            assert!(Instant::now() < deadline, "{name} did not listen on {addr} in time");
            std::thread::sleep(Duration::from_millis(50));
        }
        Middlebox { name, addr, child, dir }
    }
}

impl Drop for Middlebox {
    fn drop(&mut self) {
        // The whole process group: Apache and nginx fork workers that
        // outlive a killed master and keep its listening socket.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temp dir the middlebox's unprivileged workers can write to (squid,
/// nginx and tinyproxy drop root for a service user).
fn shared_dir(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod temp dir");
    dir
}

fn spawn(program: &str, args: &[&str], dir: &TempDir) -> Child {
    let out = std::fs::File::create(dir.path().join("stdout.log")).expect("stdout log");
    let err = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr log");
    Command::new(program)
        .args(args)
        // Its own process group, so that drop ends its workers too.
        .process_group(0)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} (scripts/test installs it): {e}"))
}

/// An Apache MD5 (`$apr1$`) password hash, which squid's basic_ncsa_auth reads.
fn openssl_apr1(password: &str) -> String {
    let out = Command::new("openssl")
        .args(["passwd", "-apr1", password])
        .output()
        .expect("run openssl passwd");
    assert!(out.status.success(), "openssl passwd failed: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 hash").trim().to_owned()
}
