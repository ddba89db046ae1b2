//! Where the numbers were measured, and how busy the machine was.

use std::process::Command;
use std::thread;

/// Where the numbers were measured.
pub(crate) struct Machine {
    cpus: usize,
    cpu_model: String,
    memory: String,
    kernel: String,
    pub(crate) date: String,
}

impl Machine {
    pub(crate) fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or_else(
                || "unknown memory".to_owned(),
                |kib| format!("{:.0} GiB", kib as f64 / (1 << 20) as f64),
            );
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map_or_else(|| "unknown date".to_owned(), |d| d.trim().to_owned());
        Machine {
            cpus: thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory,
            kernel,
            date,
        }
    }

    pub(crate) fn summary(&self) -> String {
        format!("{} CPUs ({}), {}, Linux {}", self.cpus, self.cpu_model, self.memory, self.kernel)
    }

    /// The 1-minute load average.
    pub(crate) fn load() -> String {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "?".to_owned())
    }
}
