//! Tells the build which git commit it is made from (`postern --version`,
//! `postern_build_info`). `POSTERN_COMMIT` overrides it, for builds from a
//! source tarball; without either the commit is `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    out.status.success().then(|| text.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=POSTERN_COMMIT");
    let commit = match std::env::var("POSTERN_COMMIT") {
        Ok(commit) if !commit.is_empty() => commit,
        _ => {
            // Rebuild when HEAD moves: HEAD itself, the branch it names,
            // and packed-refs, where git keeps refs it has packed.
            let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
            watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
            for name in watched {
                // A missing file would make cargo run this on every build.
                let path = git(&["rev-parse", "--git-path", &name]);
                if let Some(path) = path.filter(|path| std::path::Path::new(path).exists()) {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=POSTERN_COMMIT={commit}");
}
