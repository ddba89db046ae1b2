//! The `log` backend: one line per record on stderr, where journald (or the
//! operator's terminal) picks it up.
//!
//! ```text
//! 2026-11-25T08:30:01.123Z INFO  postern::station: device pump-17 connected
//! ^ UTC, milliseconds      ^ level ^ target         ^ message, one line
//! ```
//!
//! Our own modules log at the level asked for (`-v`/`-q`, overridden by
//! `POSTERN_LOG`); other crates are held to `warn` so a `debug` run shows
//! postern's story rather than its dependencies'. Messages may quote what a
//! peer sent, so control characters are escaped and length is capped: no
//! peer can forge or flood a log line.
//!
//! When stderr is the journal (systemd's `JOURNAL_STREAM` names the
//! stream it gave us), each line starts with its syslog priority instead of
//! a timestamp, which journald records itself, so `journalctl -p warning`
//! shows the warnings and errors:
//!
//! ```text
//! <4>WARN  postern::agent: cannot start a session: ...
//! ```
//!
//! Not here: log files, rotation, or structured output. journald does those.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Set by systemd to `DEVICE:INODE` of the journal stream it connected to
/// stdout and stderr.
const JOURNAL_VAR: &str = "JOURNAL_STREAM";

/// The environment variable that overrides the level given to [`init`].
const LEVEL_VAR: &str = "POSTERN_LOG";

/// The most other crates may log, whatever our own level.
const OTHER_CRATES_MAX: LevelFilter = LevelFilter::Warn;

/// Longest message written, in bytes, before it is cut. journald itself
/// splits lines past 48 KiB (`LineMax`); a line longer than a few KiB is a
/// dump, not a message, and would come from bytes a peer chose.
const MAX_MESSAGE_BYTES: usize = 4096;

/// Appended to a message cut at [`MAX_MESSAGE_BYTES`].
const TRUNCATED: &str = " [truncated]";

const SECONDS_PER_DAY: u64 = 86_400;

/// Install the stderr logger. `level` applies to postern's own modules
/// unless `POSTERN_LOG` names another level (`error`, `warn`, `info`,
/// `debug`, `trace` or `off`, any case); an unrecognised value is reported
/// and `level` kept. A second call changes nothing.
pub fn init(level: LevelFilter) {
    let (level, complaint) = choose_level(level, std::env::var_os(LEVEL_VAR));
    let journal = stderr_is(std::env::var_os(JOURNAL_VAR));
    let logger = StderrLogger {
        our_crate: our_crate(),
        ours: level,
        others: level.min(OTHER_CRATES_MAX),
        journal,
    };
    if log::set_boxed_logger(Box::new(logger)).is_err() {
        // Already installed: the first call's choice stands.
        return;
    }
    log::set_max_level(level);
    if let Some(complaint) = complaint {
        // Written directly so the complaint shows even at `-q`.
        write_line(&format_line(
            if journal { Stamp::Priority } else { Stamp::Time(SystemTime::now()) },
            Level::Warn,
            module_path!(),
            format_args!("{complaint}"),
        ));
    }
}

struct StderrLogger {
    /// The first segment of our module paths (`postern`).
    our_crate: &'static str,
    /// Level for targets in our crate.
    ours: LevelFilter,
    /// Level for every other target.
    others: LevelFilter,
    /// stderr is the journal: lines carry a priority, not a timestamp.
    journal: bool,
}

impl StderrLogger {
    fn is_ours(&self, target: &str) -> bool {
        target
            .strip_prefix(self.our_crate)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    }
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let limit = if self.is_ours(metadata.target()) { self.ours } else { self.others };
        metadata.level() <= limit
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            let stamp = if self.journal { Stamp::Priority } else { Stamp::Time(SystemTime::now()) };
            write_line(&format_line(stamp, record.level(), record.target(), *record.args()));
        }
    }

    fn flush(&self) {
        // Nothing useful to do if stderr is gone.
        let _ = std::io::stderr().flush();
    }
}

/// Our crate's name as it appears in log targets, taken from this module's
/// own path so it stays right if the crate is renamed.
fn our_crate() -> &'static str {
    let path: &'static str = module_path!();
    path.split("::").next().unwrap_or(path)
}

/// The level to use and, if `POSTERN_LOG` held nonsense, what to say.
fn choose_level(
    requested: LevelFilter,
    env_value: Option<std::ffi::OsString>,
) -> (LevelFilter, Option<String>) {
    let Some(raw) = env_value else {
        return (requested, None);
    };
    let text = raw.to_string_lossy();
    let text = text.trim();
    // An empty variable (`POSTERN_LOG= postern ...`) means "not set".
    if text.is_empty() {
        return (requested, None);
    }
    match text.parse::<LevelFilter>() {
        Ok(level) => (level, None),
        Err(_) => (
            requested,
            Some(format!(
                "{LEVEL_VAR}={text:?} is not a level (error, warn, info, debug, trace, off); \
                 using {}",
                requested.as_str().to_ascii_lowercase()
            )),
        ),
    }
}

/// What a line starts with.
#[derive(Debug, Clone, Copy)]
enum Stamp {
    /// The time, for a terminal or a file.
    Time(SystemTime),
    /// The syslog priority (`<4>`), for the journal, which records the time.
    Priority,
}

/// Whether `journal_stream` (`DEVICE:INODE` from [`JOURNAL_VAR`]) names
/// the stream our stderr is: a process started by systemd whose stderr was
/// redirected since still inherits the variable.
fn stderr_is(journal_stream: Option<std::ffi::OsString>) -> bool {
    let Some(value) = journal_stream else { return false };
    let parsed = value.to_str().and_then(|text| {
        let (dev, ino) = text.split_once(':')?;
        Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
    });
    let Some((dev, ino)) = parsed else { return false };
    match rustix::fs::fstat(std::io::stderr()) {
        // st_dev and st_ino are u64 on Linux and narrower only elsewhere.
        #[allow(clippy::useless_conversion)]
        Ok(stat) => u64::from(stat.st_dev) == dev && u64::from(stat.st_ino) == ino,
        Err(_) => false,
    }
}

/// syslog(3) priorities journald reads from the `<N>` prefix.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// One whole line, newline included, so it goes out in one write.
fn format_line(stamp: Stamp, level: Level, target: &str, message: fmt::Arguments<'_>) -> String {
    let mut line = String::with_capacity(128);
    // Writing to a String cannot fail.
    match stamp {
        Stamp::Time(now) => {
            write_timestamp(&mut line, now);
            line.push(' ');
        }
        Stamp::Priority => {
            let _ = write!(line, "<{}>", priority(level));
        }
    }
    let _ = write!(line, "{level:<5} {target}: ");
    let mut body = OneLine { out: &mut line, room: MAX_MESSAGE_BYTES, truncated: false };
    // An error here only means the message was cut short, which is marked.
    let _ = body.write_fmt(message);
    if body.truncated {
        line.push_str(TRUNCATED);
    }
    line.push('\n');
    line
}

/// One `write_all` on the locked stderr: records from different threads
/// never interleave, and a line under PIPE_BUF reaches journald whole.
fn write_line(line: &str) {
    // If stderr is closed there is nowhere left to report that.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// A `fmt::Write` that keeps a message on one line and under a size cap.
struct OneLine<'a> {
    out: &'a mut String,
    /// Bytes still allowed.
    room: usize,
    truncated: bool,
}

impl fmt::Write for OneLine<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for c in text.chars() {
            let before = self.out.len();
            if c.is_control() && c != '\t' {
                // `\n`, `\r`, `\u{1b}`: visible, and never a new line.
                self.out.extend(c.escape_default());
            } else {
                self.out.push(c);
            }
            let used = self.out.len() - before;
            if used > self.room {
                self.out.truncate(before);
                self.truncated = true;
                // Stop formatting: the rest would be thrown away anyway.
                return Err(fmt::Error);
            }
            self.room -= used;
        }
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC.
fn write_timestamp(out: &mut String, now: SystemTime) {
    // A clock set before 1970 prints the epoch rather than failing to log.
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(seconds / SECONDS_PER_DAY);
    let of_day = seconds % SECONDS_PER_DAY;
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        since_epoch.subsec_millis()
    );
}

/// Gregorian (year, month, day) of a count of days since 1970-01-01.
///
/// Howard Hinnant's `civil_from_days`
/// (<https://howardhinnant.github.io/date_algorithms.html>), restricted to
/// days on or after the epoch so it runs in unsigned arithmetic. It counts
/// in 400-year eras starting on 0000-03-01, so leap days fall at the end of
/// each computed year.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    /// Days from 0000-03-01 to 1970-01-01.
    const EPOCH_SHIFT: u64 = 719_468;
    /// Days in a 400-year Gregorian cycle.
    const DAYS_PER_ERA: u64 = 146_097;

    let shifted = days + EPOCH_SHIFT;
    let era = shifted / DAYS_PER_ERA;
    let day_of_era = shifted % DAYS_PER_ERA;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months counted from March, so February and its leap day come last.
    let march_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 { march_month + 3 } else { march_month - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::time::Duration;

    fn at(millis: u64) -> Stamp {
        Stamp::Time(UNIX_EPOCH + Duration::from_millis(millis))
    }

    fn stamp(millis: u64) -> String {
        let mut out = String::new();
        write_timestamp(&mut out, UNIX_EPOCH + Duration::from_millis(millis));
        out
    }

    #[test]
    fn timestamps() {
        assert_eq!(stamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(stamp(1_795_595_401_123), "2026-11-25T08:30:01.123Z");
        // 2024-02-29T23:59:59.999Z, a leap day.
        assert_eq!(stamp(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(stamp(1_709_251_200_000), "2024-03-01T00:00:00.000Z");
        // 2100 is not a leap year.
        assert_eq!(stamp(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
        assert_eq!(stamp_of(UNIX_EPOCH - Duration::from_secs(5)), "1970-01-01T00:00:00.000Z");
    }

    fn stamp_of(time: SystemTime) -> String {
        let mut out = String::new();
        write_timestamp(&mut out, time);
        out
    }

    #[test]
    fn civil_dates_match_day_by_day_count() {
        let is_leap = |y: u64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_len = |y: u64, m: u64| match m {
            2 if is_leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut year, mut month, mut day) = (1970, 1, 1);
        // Through 2500: several leap centuries and non-leap ones.
        for days in 0..195_000 {
            assert_eq!(civil_from_days(days), (year, month, day), "day {days}");
            day += 1;
            if day > month_len(year, month) {
                day = 1;
                month += 1;
                if month > 12 {
                    month = 1;
                    year += 1;
                }
            }
        }
    }

    #[test]
    fn journal_lines_start_with_the_priority_not_the_time() {
        for (level, prefix) in [
            (Level::Error, "<3>ERROR"),
            (Level::Warn, "<4>WARN "),
            (Level::Info, "<6>INFO "),
            (Level::Debug, "<7>DEBUG"),
            (Level::Trace, "<7>TRACE"),
        ] {
            let line = format_line(Stamp::Priority, level, "postern::agent", format_args!("m"));
            assert_eq!(line, format!("{prefix} postern::agent: m\n"));
        }
    }

    #[test]
    fn journal_stream_must_name_our_stderr() {
        assert!(!stderr_is(None));
        assert!(!stderr_is(Some("".into())));
        assert!(!stderr_is(Some("8:x".into())));
        let stat = rustix::fs::fstat(std::io::stderr()).expect("fstat stderr");
        #[allow(clippy::useless_conversion)]
        let (dev, ino) = (u64::from(stat.st_dev), u64::from(stat.st_ino));
        assert!(stderr_is(Some(format!("{dev}:{ino}").into())));
        assert!(!stderr_is(Some(format!("{dev}:{}", ino + 1).into())));
    }

    #[test]
    fn line_format() {
        let line = format_line(
            at(1_795_595_401_123),
            Level::Info,
            "postern::station",
            format_args!("device {} connected", "pump-17"),
        );
        assert_eq!(
            line,
            "2026-11-25T08:30:01.123Z INFO  postern::station: device pump-17 connected\n"
        );
        let line = format_line(at(0), Level::Error, "x", format_args!("e"));
        assert_eq!(line, "1970-01-01T00:00:00.000Z ERROR x: e\n");
    }

    #[test]
    fn control_characters_are_escaped() {
        let line = format_line(
            at(0),
            Level::Warn,
            "postern::carrier",
            format_args!("bad header {:?}\n{}", "a", "fake\r\n2026 INFO forged\u{1b}[31m\tok"),
        );
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z WARN  postern::carrier: bad header \"a\"\\nfake\\r\\n2026 INFO forged\\u{1b}[31m\tok\n"
        );
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let line = format_line(at(0), Level::Debug, "postern", format_args!("{long}"));
        let prefix = "1970-01-01T00:00:00.000Z DEBUG postern: ";
        let body = line
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(&format!("{TRUNCATED}\n")))
            .expect("prefix and truncation marker");
        assert_eq!(body.len(), MAX_MESSAGE_BYTES);
        assert!(body.chars().all(|c| c == 'é'));

        let exact = "a".repeat(MAX_MESSAGE_BYTES);
        let line = format_line(at(0), Level::Debug, "postern", format_args!("{exact}"));
        assert_eq!(line, format!("{prefix}{exact}\n"));
    }

    #[test]
    fn filters_by_crate() {
        let logger = StderrLogger {
            our_crate: "postern",
            ours: LevelFilter::Debug,
            others: LevelFilter::Debug.min(OTHER_CRATES_MAX),
            journal: false,
        };
        let enabled = |level: Level, target: &str| {
            logger.enabled(&Metadata::builder().level(level).target(target).build())
        };
        assert!(enabled(Level::Debug, "postern"));
        assert!(enabled(Level::Debug, "postern::core::session"));
        assert!(!enabled(Level::Trace, "postern::core::session"));
        assert!(!enabled(Level::Info, "async_io::reactor"));
        assert!(enabled(Level::Warn, "async_io::reactor"));
        assert!(!enabled(Level::Debug, "postern_bench"));

        let quiet = StderrLogger {
            our_crate: "postern",
            ours: LevelFilter::Error,
            others: LevelFilter::Error.min(OTHER_CRATES_MAX),
            journal: false,
        };
        let quiet_enabled = |level: Level, target: &str| {
            quiet.enabled(&Metadata::builder().level(level).target(target).build())
        };
        assert!(!quiet_enabled(Level::Warn, "polling"));
        assert!(quiet_enabled(Level::Error, "polling"));
    }

    #[test]
    fn our_crate_is_first_path_segment() {
        let name = our_crate();
        assert!(!name.is_empty());
        assert!(!name.contains(':'));
        assert!(module_path!().starts_with(name));
    }

    #[test]
    fn env_level_override() {
        let env = |text: &str| Some(OsString::from(text));
        assert_eq!(choose_level(LevelFilter::Info, None), (LevelFilter::Info, None));
        assert_eq!(choose_level(LevelFilter::Info, env("debug")), (LevelFilter::Debug, None));
        assert_eq!(choose_level(LevelFilter::Info, env(" TRACE\n")), (LevelFilter::Trace, None));
        assert_eq!(choose_level(LevelFilter::Warn, env("")), (LevelFilter::Warn, None));
        let (level, complaint) = choose_level(LevelFilter::Info, env("verbose"));
        assert_eq!(level, LevelFilter::Info);
        assert_eq!(
            complaint.as_deref(),
            Some(
                "POSTERN_LOG=\"verbose\" is not a level (error, warn, info, debug, trace, off); \
                 using info"
            )
        );
    }

    #[test]
    fn init_twice_is_harmless() {
        init(LevelFilter::Info);
        let after_first = log::max_level();
        init(LevelFilter::Trace);
        assert_eq!(log::max_level(), after_first);
    }
}
