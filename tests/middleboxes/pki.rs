//! A test CA and certificates made with the openssl command line, in a
//! temp dir: a leaf signed by the CA for a name, an expired one, one for
//! another name, and a self-signed one. EC P-256 keys: quick to make.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use crate::common::TempDir;

/// A certificate and its key, as PEM files.
pub(crate) struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA and the files it signed.
pub(crate) struct Pki {
    pub dir: TempDir,
    pub ca: Cert,
}

fn openssl(dir: &TempDir, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir.path())
        .output()
        .expect("run openssl (scripts/test installs it)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];

impl Pki {
    /// A new CA named `name`.
    pub(crate) fn new(name: &str) -> Pki {
        let dir = TempDir::new("pki");
        let subject = format!("/CN={name}");
        let mut args = vec!["req", "-x509", "-nodes", "-keyout", "ca.key", "-out", "ca.pem"];
        args.extend(EC);
        args.extend(["-days", "2", "-subj", &subject]);
        args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
        args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        openssl(&dir, &args);
        let ca = Cert { cert: dir.path().join("ca.pem"), key: dir.path().join("ca.key") };
        Pki { dir, ca }
    }

    /// A server certificate for `san` (e.g. `IP:127.0.0.1`), valid for
    /// `days` (negative: expired), signed by the CA.
    pub(crate) fn leaf(&self, label: &str, san: &str, days: i32) -> Cert {
        let (key, csr, pem) =
            (format!("{label}.key"), format!("{label}.csr"), format!("{label}.pem"));
        let mut args = vec!["req", "-nodes", "-keyout", &key, "-out", &csr, "-subj", "/CN=station"];
        args.extend(EC);
        openssl(&self.dir, &args);
        let ext = self.dir.write(
            &format!("{label}.ext"),
            &format!(
                "subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            ),
        );
        let days = days.to_string();
        let ext = ext.to_str().expect("utf-8 path");
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                &days,
                "-extfile",
                ext,
            ],
        );
        Cert { cert: self.dir.path().join(pem), key: self.dir.path().join(key) }
    }

    /// A self-signed server certificate for `san`.
    pub(crate) fn self_signed(&self, label: &str, san: &str) -> Cert {
        let (key, pem) = (format!("{label}.key"), format!("{label}.pem"));
        let san = format!("subjectAltName={san}");
        let mut args = vec!["req", "-x509", "-nodes", "-keyout", &key, "-out", &pem];
        args.extend(EC);
        args.extend(["-days", "2", "-subj", "/CN=station", "-addext", &san]);
        args.extend(["-addext", "basicConstraints=CA:FALSE"]);
        openssl(&self.dir, &args);
        Cert { cert: self.dir.path().join(pem), key: self.dir.path().join(key) }
    }
}
