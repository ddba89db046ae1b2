//! `station.toml` and `agent.toml` text, as `postern check` and start-up
//! read it: TOML, then every field checked (addresses, URLs, keys, names,
//! cross-references).
//!
//! Beyond "no panic": an error names the file, and a config that loads
//! satisfies what the station and agent rely on (every allowed target
//! exists). Configs naming a `private_key_file` are skipped: reading files
//! the fuzzer names (a FIFO, /dev/stdin) could block the run, and that path
//! is a file read, not parsing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::config::{AgentConfig, StationConfig};

const FILE: &str = "/nonexistent/fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if names_a_key_file(text) {
        return;
    }
    match StationConfig::parse(text, FILE) {
        Ok(station) => {
            for device in &station.devices {
                for target in &device.allow {
                    assert!(station.targets.contains_key(target), "{target} allowed but missing");
                }
            }
        }
        Err(error) => assert!(error.to_string().starts_with(FILE), "{error}"),
    }
    match AgentConfig::parse(text, FILE) {
        Ok(agent) => {
            assert!(agent.station.path_prefix.starts_with('/'));
            assert!(agent.station.path_prefix.ends_with('/'));
        }
        Err(error) => assert!(error.to_string().starts_with(FILE), "{error}"),
    }
});

/// Whether any table in the document has a `private_key_file` key, however
/// the key is spelled (quoted, escaped) in the text.
fn names_a_key_file(text: &str) -> bool {
    fn walk(value: &toml::Value) -> bool {
        match value {
            toml::Value::Table(table) => {
                table.contains_key("private_key_file") || table.values().any(walk)
            }
            toml::Value::Array(items) => items.iter().any(walk),
            _ => false,
        }
    }
    match text.parse::<toml::Table>() {
        Ok(table) => table.contains_key("private_key_file") || table.values().any(walk),
        // Not TOML: neither config gets as far as reading a key file.
        Err(_) => false,
    }
}
