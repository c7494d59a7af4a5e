//! CPU time and peak memory of the processes a run involves, read from `/proc`.
//!
//! A [`Snapshot`] is taken when publishing starts and another when the drain ends; the
//! difference is the CPU each process spent on the measured work. Peak memory is the
//! kernel's high-water mark of resident memory (`VmHWM`) at the end, over the process's
//! whole life. PostgreSQL and RabbitMQ are found by process name (`postgres`,
//! `beam.smp`) and summed over every such process on the machine — including whatever
//! else they serve — and, for PostgreSQL, the backends that ended during the run (the
//! postmaster's reaped-children time). Off Linux every figure is absent.

use std::time::Instant;

/// A process whose figures are reported.
#[derive(Debug, Clone)]
pub struct Watched {
    pub label: String,
    pub pid: u32,
}

/// CPU of a set of processes found by name.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupCpu {
    pub processes: u32,
    pub ticks: u64,
}

/// Figures at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub at: Instant,
    /// Per watched process: user+system CPU ticks, and VmHWM in KiB.
    pub watched: Vec<(Watched, Option<u64>, Option<u64>)>,
    /// The bench process itself (publishers and receiver).
    pub bench: (Option<u64>, Option<u64>),
    /// CPU ticks of the bench's children that it has waited for (in external mode, the
    /// load generator once it has exited).
    pub bench_children: Option<u64>,
    pub postgres: Option<GroupCpu>,
    pub rabbitmq: Option<GroupCpu>,
    /// Whole machine: busy and total CPU ticks over every core since boot.
    pub machine: Option<(u64, u64)>,
}

impl Snapshot {
    pub fn take(watched: &[Watched]) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            watched: watched
                .iter()
                .map(|w| {
                    (
                        w.clone(),
                        cpu_ticks(&w.pid.to_string()),
                        peak_rss_kib(&w.pid.to_string()),
                    )
                })
                .collect(),
            bench: (cpu_ticks("self"), peak_rss_kib("self")),
            bench_children: stat_times("self").map(|(_, t)| t[2] + t[3]),
            postgres: group_cpu("postgres"),
            rabbitmq: group_cpu("beam.smp"),
            machine: machine_ticks(),
        }
    }
}

/// Clock ticks per second of the CPU times in `/proc`.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant; it has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// The fields of `/proc/<pid>/stat` after the command name: utime, stime, cutime, cstime.
fn stat_times(pid: &str) -> Option<(String, [u64; 4])> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    // After ") ": state is field 3, utime field 14 … cstime field 17.
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let field = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((comm, [field(11)?, field(12)?, field(13)?, field(14)?]))
}

/// User + system CPU ticks of a process (`self` for this one).
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    stat_times(pid).map(|(_, t)| t[0] + t[1])
}

/// Peak resident memory of a process in KiB.
pub fn peak_rss_kib(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU of every process named `comm`, including the time of children they reaped.
fn group_cpu(comm: &str) -> Option<GroupCpu> {
    let mut out = GroupCpu::default();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Some((c, t)) = stat_times(pid)
            && c == comm
        {
            out.processes += 1;
            out.ticks += t.iter().sum::<u64>();
        }
    }
    (out.processes > 0).then_some(out)
}

/// Busy and total CPU ticks of the machine since boot (`/proc/stat`).
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        // Burn a little CPU so that the counter is not trivially zero.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_ticks("self").is_some());
        assert!(peak_rss_kib("self").is_some_and(|k| k > 0));
        assert!(machine_ticks().is_some_and(|(b, t)| b <= t && t > 0));
    }
}
