//! Reading what the kernel says about a process.

/// The KiB value of field `name` (`VmRSS:`...) in a `/proc/PID/status` (or `smaps_rollup`)
/// text.
pub fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The KiB value of field `name` in this process's `/proc/self/status`.
pub fn self_status_kib(name: &str) -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/self/status").ok()?, name)
}

/// Field `n` (numbered from 1, as proc(5) does; 3 or more) of `/proc/PID/stat`, `pid` being a
/// number or `self`.
fn stat_field(pid: &str, n: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// The process start time (field 22 of /proc/PID/stat, clock ticks since boot): with the pid,
/// it names one process, whatever pid reuse happens later.
pub fn start_ticks(pid: u32) -> Option<u64> {
    stat_field(&pid.to_string(), 22)
}

/// This process's parent (field 4 of /proc/self/stat), as `/proc` numbers it (`getppid`
/// answers in the caller's PID namespace); 0 for the first process of a PID namespace.
pub fn self_parent() -> Option<u32> {
    u32::try_from(stat_field("self", 4)?).ok()
}

/// The processes `pid` made that are still there (its threads' `children` lists), as the host
/// names them.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut kids: Vec<u32> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    kids.sort_unstable();
    kids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_by_name() {
        let text = "Name:\tbexar\nVmRSS:\t  4464 kB\nRssAnon:\t 360 kB\n";
        assert_eq!(kib_field(text, "VmRSS:"), Some(4464));
        assert_eq!(kib_field(text, "RssAnon:"), Some(360));
        assert_eq!(kib_field(text, "RssShmem:"), None);
        assert!(self_status_kib("VmRSS:").is_some_and(|k| k > 0));
    }

    #[test]
    fn start_time_of_this_process_is_stable() {
        let me = std::process::id();
        let t = start_ticks(me).expect("own start time");
        assert_eq!(start_ticks(me), Some(t));
    }
}
