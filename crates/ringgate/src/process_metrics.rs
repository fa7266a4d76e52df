//! The standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_start_time_seconds`), read
//! from /proc at scrape time, so stock dashboards and alerts work unchanged.

/// (name, type, help, value) of each process metric this host can read.
pub fn figures() -> Vec<(&'static str, &'static str, &'static str, f64)> {
    let mut out = Vec::new();
    // SAFETY: sysconf has no pointer arguments.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // SAFETY: sysconf has no pointer arguments.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    if let Some(stat) = self_stat() {
        // Fields after the command's closing parenthesis, from field 3 (state).
        let field = |n: usize| stat.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(utime), Some(stime)) = (field(14), field(15)) {
            out.push((
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                (utime + stime) / ticks,
            ));
        }
        if let Some(vsize) = field(23) {
            out.push((
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                vsize,
            ));
        }
        if let Some(rss) = field(24) {
            out.push((
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                rss * page,
            ));
        }
        if let (Some(start), Some(boot)) = (field(22), boot_time()) {
            out.push((
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                boot + start / ticks,
            ));
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        out.push((
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        ));
    }
    out.push((
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        ringgate_shard::nofile_soft_limit() as f64,
    ));
    out
}

/// /proc/self/stat's fields after the command name (which may hold spaces).
fn self_stat() -> Option<Vec<String>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// When the machine booted, in seconds since the epoch (/proc/stat's btime).
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_standard_process_metric_is_read_on_linux() {
        let names: Vec<&str> = figures().iter().map(|f| f.0).collect();
        for name in [
            "process_cpu_seconds_total",
            "process_virtual_memory_bytes",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        let start = figures()
            .into_iter()
            .find(|f| f.0 == "process_start_time_seconds")
            .unwrap()
            .3;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
    }
}
