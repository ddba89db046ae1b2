//! The Markdown the driver prints and writes into the document: the
//! figures gathered ([`Report`]), their formatting, and the rewriting of
//! the document's generated sections. The goals are in report/goals.rs,
//! the tables in report/tables.rs.

mod goals;
mod tables;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::args::Options;
use crate::machine::Machine;
use crate::measure::{millis, Latency, Sample, Test};
use crate::memory::{DeviceMemory, Idle};
use crate::routes::Route;
use crate::MIB;

/// What a run measured, to be written out as Markdown.
pub(crate) struct Report<'a> {
    pub(crate) options: &'a Options,
    pub(crate) machine: Machine,
    pub(crate) load: (String, String),
    pub(crate) run_time: Duration,
    pub(crate) samples: BTreeMap<(Route, Test), Vec<Sample>>,
    pub(crate) latencies: BTreeMap<Route, Vec<Latency>>,
    pub(crate) failures: BTreeMap<(Route, Test), String>,
    pub(crate) peak_rss: BTreeMap<Route, [u64; 2]>,
    pub(crate) idle: Vec<Idle>,
    pub(crate) devices: Vec<(&'static str, Result<DeviceMemory, String>)>,
    pub(crate) sizes: Vec<(String, Result<u64, String>)>,
}

/// A rate in MB/s, with a decimal where the number is small.
fn megabytes(rate: f64) -> String {
    let mb = rate / 1e6;
    if mb < 100.0 {
        format!("{mb:.1}")
    } else {
        format!("{mb:.0}")
    }
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / MIB as f64)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Median and range of some figures, as "median (min–max)".
fn spread(mut values: Vec<f64>, show: impl Fn(f64) -> String) -> String {
    let middle = median(&mut values);
    format!("{} ({}–{})", show(middle), show(values[0]), show(values[values.len() - 1]))
}

fn ms(value: f64) -> String {
    if value < 1.0 {
        format!("{value:.3}")
    } else {
        format!("{value:.2}")
    }
}

/// A ratio, with the verdict against a goal.
fn verdict(ratio: f64, goal: f64, at_least: bool) -> &'static str {
    if (at_least && ratio >= goal) || (!at_least && ratio <= goal) {
        "met"
    } else {
        "**missed**"
    }
}

impl Report<'_> {
    fn median_rate(&self, route: Route, test: Test) -> Option<f64> {
        let samples = self.samples.get(&(route, test))?;
        Some(median(&mut samples.iter().map(|s| s.rate).collect::<Vec<_>>()))
    }

    fn median_latency(&self, route: Route) -> Option<(f64, f64)> {
        let rounds = self.latencies.get(&route)?;
        let p50 = median(&mut rounds.iter().map(|l| millis(l.p50)).collect::<Vec<_>>());
        let p99 = median(&mut rounds.iter().map(|l| millis(l.p99)).collect::<Vec<_>>());
        Some((p50, p99))
    }

    /// The generated parts of the document, by marker name.
    pub(crate) fn sections(&self) -> Vec<(&'static str, String)> {
        vec![
            ("goals", self.goals()),
            ("throughput table", self.throughput()),
            ("latency table", self.latency()),
            ("memory table", self.memory()),
            ("sizes table", self.sizes()),
        ]
    }

    fn reference(&self) -> String {
        format!("Measured in the run of {} recorded under [Goals](#goals).\n\n", self.machine.date)
    }
}

/// Replaces the generated parts of the document (between the markers of
/// each section), leaving every other part as it is. A section whose
/// markers are missing is added at the end under its own heading.
pub(crate) fn write_sections(doc: &Path, sections: &[(&str, String)]) -> Result<(), String> {
    let mut text = std::fs::read_to_string(doc).unwrap_or_default();
    for (name, body) in sections {
        let begin = format!("<!-- scripts/bench: {name} begins -->");
        let end = format!("<!-- scripts/bench: {name} ends -->");
        let generated = format!("{begin}\n{body}{end}");
        text = match (text.find(&begin), text.find(&end)) {
            (Some(b), Some(e)) if b < e => {
                format!("{}{generated}{}", &text[..b], &text[e + end.len()..])
            }
            _ => {
                if text.is_empty() {
                    text.push_str("# Benchmarks\n");
                }
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                format!("{text}\n## {name}\n\n{generated}\n")
            }
        };
    }
    std::fs::write(doc, text).map_err(|e| format!("{}: {e}", doc.display()))
}
