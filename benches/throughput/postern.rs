//! A postern route: a station and an agent with a forward per target,
//! and the way between them (direct, squid, nginx, TLS, a delayed hop).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;

use postern::keys::PrivateKey;

use crate::middleboxes::pki::Pki;
use crate::middleboxes::Middlebox;
use crate::routes::{catching, entries_of, Running, Via, NGINX_FOR_STREAM};
use crate::support::path::{DelayedHop, Hop};
use crate::support::{free_port, parse_addr, parse_port, wait_for_line, Proc, Side, TempDir};

/// One postern route: a station and an agent, the way between them.
pub(crate) struct Postern<'a> {
    pub(crate) station: &'a Path,
    pub(crate) agent: &'a Path,
    pub(crate) carrier: &'a str,
    pub(crate) via: Via,
    pub(crate) delay: Option<Hop>,
}

impl Postern<'_> {
    /// Starts the station with `targets`, the way, and the agent with one
    /// forward per target.
    pub(crate) fn start(&self, targets: &[(&str, SocketAddr)]) -> Result<Running, String> {
        let carrier = self.carrier;
        let dir = TempDir::new(carrier);
        let station_key = PrivateKey::generate();
        let agent_key = PrivateKey::generate();
        let names: Vec<String> = targets.iter().map(|(name, _)| format!("{name:?}")).collect();
        let mut station_toml =
            format!("listen = \"127.0.0.1:0\"\nprivate_key = \"{}\"\n", station_key.to_base64());
        let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
        // A test CA and a certificate for 127.0.0.1, for the TLS ways.
        let pki = matches!(self.via, Via::Tls | Via::NginxTls)
            .then(|| catching(|| Pki::new("bench CA")).map_err(|e| format!("openssl: {e}")))
            .transpose()?;
        let leaf = pki.as_ref().map(|pki| pki.leaf("station", "IP:127.0.0.1", 1));
        if let (Via::Tls, Some(leaf)) = (self.via, &leaf) {
            let _ = writeln!(
                station_toml,
                "tls_cert_file = {:?}\ntls_key_file = {:?}",
                leaf.cert.display().to_string(),
                leaf.key.display().to_string()
            );
        }
        station_toml.push_str("\n[targets]\n");
        for (name, addr) in targets {
            let _ = writeln!(station_toml, "{name} = \"{addr}\"");
        }
        let _ = write!(
            station_toml,
            "\n[[devices]]\nname = \"bench\"\npublic_key = \"{}\"\nallow = [{}]\n",
            agent_key.public_key().to_base64(),
            names.join(", ")
        );
        let station_path = dir.write("station.toml", &station_toml);
        let (tx, station_lines) = mpsc::channel();
        let station = Proc::spawn(
            &format!("postern station ({carrier})"),
            Side::Central,
            Command::new(self.station).arg("station").arg("-c").arg(&station_path),
            tx,
        )?;
        let rest = wait_for_line(&station_lines, "station listening on ", &station)?;
        let mut station_addr =
            parse_addr(&rest).ok_or(format!("no address in station log line {rest:?}"))?;
        if let Some(delay) = self.delay {
            let proxy = DelayedHop::start(station_addr, delay)?;
            station_addr = proxy.addr;
            keep.push(Box::new(proxy));
        }
        let (url, proxy) = match self.via {
            Via::Direct => (format!("http://{station_addr}/"), None),
            Via::Tls => (format!("https://{station_addr}/"), None),
            Via::NginxTls => {
                let leaf = leaf.as_ref().expect("made above for TLS");
                let nginx = catching(|| {
                    Middlebox::nginx_tls(station_addr, "/tunnel/", NGINX_FOR_STREAM, leaf, None)
                })
                .map_err(|e| format!("nginx: {e}"))?;
                let url = format!("https://{}/tunnel/", nginx.addr);
                keep.push(Box::new(nginx));
                (url, None)
            }
            Via::Squid => {
                let squid = catching(|| Middlebox::squid_with(None, None))
                    .map_err(|e| format!("squid: {e}"))?;
                let proxy = format!("http://{}", squid.addr);
                keep.push(Box::new(squid));
                (format!("http://{station_addr}/"), Some(proxy))
            }
            Via::Nginx | Via::NginxTuned => {
                let extra = if self.via == Via::NginxTuned { NGINX_FOR_STREAM } else { "" };
                let nginx =
                    catching(|| Middlebox::nginx_with(station_addr, "/tunnel/", extra, None))
                        .map_err(|e| format!("nginx: {e}"))?;
                let url = format!("http://{}/tunnel/", nginx.addr);
                keep.push(Box::new(nginx));
                (url, None)
            }
        };

        let mut agent_toml = format!(
            "station = \"{url}\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n\
             carrier = \"{carrier}\"\n",
            station_key.public_key().to_base64(),
            agent_key.to_base64(),
        );
        if let Some(proxy) = proxy {
            let _ = writeln!(agent_toml, "proxy = \"{proxy}\"");
        }
        if let Some(pki) = pki {
            let _ = writeln!(agent_toml, "ca_file = {:?}", pki.ca.cert.display().to_string());
            keep.push(Box::new(pki));
        }
        // The config refuses two forwards on port 0, so ask for free ports.
        for (name, _) in targets {
            let _ = write!(
                agent_toml,
                "\n[[forward]]\nlisten = \"127.0.0.1:{}\"\ntarget = \"{name}\"\n",
                free_port()?
            );
        }
        let agent_path = dir.write("agent.toml", &agent_toml);
        let (tx, agent_lines) = mpsc::channel();
        let agent = Proc::spawn(
            &format!("postern agent ({carrier})"),
            Side::Device,
            Command::new(self.agent)
                .arg("agent")
                .arg("-c")
                .arg(&agent_path)
                .env_remove("HTTP_PROXY")
                .env_remove("http_proxy"),
            tx,
        )?;
        let mut entries = BTreeMap::new();
        for _ in targets {
            let rest = wait_for_line(&agent_lines, "forwarding 127.0.0.1:", &agent)?;
            let port = parse_port(&rest).ok_or(format!("no port in agent log line {rest:?}"))?;
            let target = rest.rsplit('"').nth(1).unwrap_or_default().to_owned();
            entries.insert(target, SocketAddr::from(([127, 0, 0, 1], port)));
        }
        keep.push(Box::new(dir));
        Ok(Running { entries: entries_of(&entries), procs: vec![station, agent], _keep: keep })
    }
}
