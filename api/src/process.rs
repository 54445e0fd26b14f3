//! The standard `process_*` metrics of Prometheus client libraries
//! (CPU seconds, resident and virtual memory, open and maximum file
//! descriptors, start time), from Linux's `/proc/self`. The caller reads
//! the files (this crate does no IO); anything it cannot read is left out.

use std::fmt::Write as _;

/// Clock ticks per second of `/proc` times (`CLK_TCK`, 100 on Linux).
const TICKS: f64 = 100.0;
/// Page size of `/proc/self/statm` (4 KiB on the platforms the images
/// are built for).
const PAGE: u64 = 4096;

/// The `process_*` families in the text format. `read` returns a
/// `/proc` file's content; `open_fds` is the number of entries of
/// `/proc/self/fd`.
pub fn render(read: &dyn Fn(&str) -> Option<String>, open_fds: Option<usize>) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let sample = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            let _ = writeln!(out, "{sample} {v}");
        }
    };
    // /proc/self/stat: the fields after the command (which may hold spaces
    // and parentheses) start after the last ')'; utime, stime and
    // starttime are fields 14, 15 and 22 of the whole line.
    let stat = read("/proc/self/stat");
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    let cpu = field(14).zip(field(15)).map(|(u, s)| (u + s) / TICKS);
    family(
        "process_cpu_seconds",
        "counter",
        "Total user and system CPU time spent in seconds.",
        cpu,
    );
    let boot = read("/proc/stat").and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        boot.zip(field(22)).map(|(b, t)| b + t / TICKS),
    );
    let statm = read("/proc/self/statm");
    let pages = |i: usize| {
        statm
            .as_deref()
            .and_then(|s| s.split_whitespace().nth(i))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|p| (p * PAGE) as f64)
    };
    family(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        pages(0),
    );
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        pages(1),
    );
    family(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        open_fds.map(|n| n as f64),
    );
    let max_fds = read("/proc/self/limits").and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<f64>().ok())
    });
    family(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        max_fds,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_become_the_standard_process_metrics() {
        let files = |p: &str| -> Option<String> {
            Some(
                match p {
                    "/proc/self/stat" => "42 (devplug agent) S 1 42 42 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 8 0 12345 100000000 3000 18446744073709551615",
                    "/proc/stat" => "cpu  1 2 3\nbtime 1700000000\nprocesses 9",
                    "/proc/self/statm" => "2500 750 300 100 0 400 0",
                    "/proc/self/limits" => "Limit                     Soft Limit           Hard Limit           Units     \nMax open files            1048576              1048576              files     ",
                    _ => return None,
                }
                .to_string(),
            )
        };
        let text = render(&files, Some(17));
        for line in [
            "process_cpu_seconds_total 3",
            "process_start_time_seconds 1700000123.45",
            "process_virtual_memory_bytes 10240000",
            "process_resident_memory_bytes 3072000",
            "process_open_fds 17",
            "process_max_fds 1048576",
            "# TYPE process_cpu_seconds counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // What cannot be read is left out, never made up.
        assert_eq!(render(&|_| None, None), "");
    }
}
