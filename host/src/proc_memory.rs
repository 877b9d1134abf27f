//! Memory figures read from `/proc` and `/sys`: this process's, the whole host's, and what the
//! machine (or the cgroup) allows.

/// This process's resident memory.
pub fn resident_bytes() -> u64 {
    process_resident_bytes("self").unwrap_or(0)
}

/// This process's private resident memory (`RssAnon`): what it took beyond the files it maps.
pub fn private_resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("RssAnon:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

/// The whole host's resident memory, from a worker: its master and every child of the master.
pub fn host_resident_bytes() -> u64 {
    // SAFETY: getppid has no preconditions.
    let master = unsafe { libc::getppid() }.to_string();
    let mut total = process_resident_bytes(&master).unwrap_or(0);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return total;
    };
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        // Only the numbered entries: /proc/self and /proc/thread-self would count this process again.
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name: state, ppid, …
        let parent = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if parent == Some(master.as_str()) {
            total += process_resident_bytes(&pid).unwrap_or(0);
        }
    }
    total
}

/// The memory this host may use when no budget says: its cgroup's limit, else the machine's.
pub fn machine_memory_limit() -> u64 {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok());
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .map(|kib| kib * 1024)
        });
    match (cgroup, machine) {
        (Some(cgroup), Some(machine)) => cgroup.min(machine),
        (cgroup, machine) => cgroup.or(machine).unwrap_or(0),
    }
}

fn process_resident_bytes(pid: &str) -> Option<u64> {
    statm(pid).map(|(resident, _)| resident)
}

/// A process's resident and shared (file-backed) memory in bytes, from /proc/<pid>/statm.
pub fn statm(pid: &str) -> Option<(u64, u64)> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let mut pages = statm.split_whitespace().skip(1).map(str::parse::<u64>);
    let (Some(Ok(resident)), Some(Ok(shared))) = (pages.next(), pages.next()) else {
        return None;
    };
    Some((resident * page_size(), shared * page_size()))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64
}
