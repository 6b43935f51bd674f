//! Every question asked of, and every request made to, the operating system outside plain file
//! I/O: process liveness and signals, memory (ours, a child's, the machine's), our uid, CPU
//! and I/O priority, free disk space (and whether an error is a full disk), the cgroup's OOM
//! kills, and the open-file limit. The rest of the crate never calls libc for these (pueue's
//! `process_helper/`). Platform differences are a few `cfg` lines each:
//! - Linux reads `/proc/<pid>/status` (VmRSS, VmHWM) and sets I/O priority with `ioprio_set`.
//! - macOS asks `proc_pid_rusage` for the *physical footprint*, which, unlike RSS, counts memory
//!   the GPU holds in unified memory (Metal buffers): the figure that froze the original machine.
//!   This path is compiled only on macOS and is not verified on this Linux machine.

use std::io;
use std::path::Path;

/// Whether a process with this pid exists (signal 0 probes without sending). A pid that does not
/// fit a positive `pid_t` is never alive: `kill(-n, 0)` would probe a whole process group.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else { return false };
    if p <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(p, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Sends `signal` to `pid`. Callers signal only their own unreaped children, or a pid they just
/// proved alive and that still holds the run's lock, so the pid cannot have been recycled.
pub fn signal(pid: u32, signal: i32) -> io::Result<()> {
    let p = libc::pid_t::try_from(pid).ok().filter(|p| *p > 0).ok_or_else(|| io::Error::other("bad pid"))?;
    // SAFETY: kill has no memory-safety preconditions; the pid is positive (one process).
    if unsafe { libc::kill(p, signal) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Sends `signal` to the process group `pgid` (a child started as the leader of its own group).
pub fn signal_group(pgid: u32, signal: i32) -> io::Result<()> {
    let p = libc::pid_t::try_from(pgid).ok().filter(|p| *p > 1).ok_or_else(|| io::Error::other("bad process group"))?;
    // SAFETY: kill has no memory-safety preconditions; -p names one process group (p > 1).
    if unsafe { libc::kill(-p, signal) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The real user id of this process.
pub fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Physical memory of this machine in MB (0 if unknown).
pub fn machine_memory_mb() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages <= 0 || size <= 0 { 0 } else { (pages as u64 * size as u64) >> 20 }
}

/// Memory of a process in MB as the watchdog judges it: resident set on Linux, physical
/// footprint (GPU-resident unified memory included) on macOS. None if the process is gone.
pub fn process_memory_mb(pid: u32) -> Option<u64> {
    #[cfg(target_os = "macos")]
    return mac::footprint(pid).map(|(now, _)| now >> 20);
    #[cfg(not(target_os = "macos"))]
    proc_status_mb(&pid.to_string(), "VmRSS")
}

/// Peak memory of this process in MB (Linux `VmHWM`, macOS lifetime max footprint; 0 if unknown).
pub fn peak_memory_mb() -> u64 {
    #[cfg(target_os = "macos")]
    return mac::footprint(std::process::id()).map_or(0, |(_, peak)| peak >> 20);
    #[cfg(not(target_os = "macos"))]
    proc_status_mb("self", "VmHWM").unwrap_or(0)
}

/// A `kB` field of `/proc/<who>/status`, in MB.
#[cfg(not(target_os = "macos"))]
fn proc_status_mb(who: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{who}/status")).ok()?;
    let line = s.lines().find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

#[cfg(target_os = "macos")]
mod mac {
    /// (current, lifetime peak) physical footprint in bytes.
    pub fn footprint(pid: u32) -> Option<(u64, u64)> {
        let mut info = std::mem::MaybeUninit::<libc::rusage_info_v4>::zeroed();
        // SAFETY: the buffer is a rusage_info_v4, which is what flavor RUSAGE_INFO_V4 writes.
        let r = unsafe {
            libc::proc_pid_rusage(
                pid as libc::c_int,
                libc::RUSAGE_INFO_V4,
                info.as_mut_ptr() as *mut libc::rusage_info_t,
            )
        };
        // SAFETY: proc_pid_rusage filled the struct when it returned 0.
        (r == 0).then(|| unsafe { info.assume_init() }).map(|i| (i.ri_phys_footprint, i.ri_lifetime_max_phys_footprint))
    }
}

/// Lowers this process's CPU priority to `nice` (0..=19) and, on Linux, its I/O priority to
/// best-effort level 7 (the lowest): a run uses every idle cycle but yields to the desktop.
/// macOS has no separate I/O class here: `PRIO_DARWIN_BG` would also throttle the run's CPU and
/// GPU to a trickle, so only the nice value is set there.
pub fn lower_priority(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority on our own process (who = 0) has no memory-safety preconditions.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS as _, 0, nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[cfg(target_os = "linux")]
    {
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_BE: libc::c_long = 2;
        let prio = (IOPRIO_CLASS_BE << 13) | 7;
        // SAFETY: ioprio_set(which, who = 0 (self), prio) takes no pointers.
        if unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0 as libc::c_long, prio) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A process's (nice value, Linux I/O priority as `class << 13 | level`), for tests and doctor.
/// None if the process is gone. (getpriority's -1 is both a value and its error; the process is
/// known to exist first, so here it is the value.)
pub fn priority(pid: u32) -> Option<(i32, Option<i64>)> {
    if !pid_alive(pid) {
        return None;
    }
    // SAFETY: no pointers are involved.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS as _, pid as libc::id_t) };
    #[cfg(target_os = "linux")]
    // SAFETY: ioprio_get(which = process, who) takes no pointers.
    let io = Some(unsafe { libc::syscall(libc::SYS_ioprio_get, 1 as libc::c_long, pid as libc::c_long) } as i64);
    #[cfg(not(target_os = "linux"))]
    let io = None;
    Some((nice, io))
}

/// CPU time (user + system) a process has used, in clock ticks, from `/proc/<pid>/stat` (Linux).
#[cfg(target_os = "linux")]
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after its closing ')' are plain.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (for [`cpu_ticks`]).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Megabytes free to an unprivileged writer on the file system holding `path` (statvfs), or
/// `None` where it cannot be asked.
pub fn free_space_mb(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes only into `st`; `c` is a valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64) >> 20)
}

/// Whether an I/O error is the disk refusing a write: full (ENOSPC), over quota (EDQUOT) or
/// read-only (EROFS), all of which pass once someone frees space or remounts.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS))
}

/// How many times the kernel's OOM killer has acted in this process's cgroup and below
/// (`oom_kill` in the cgroup v2 `memory.events`), or `None` where there is no such file (cgroup
/// v1, macOS, no memory controller).
pub fn cgroup_oom_kills() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let events = std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.events", rel.trim_end())).ok()?;
    events.lines().find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
}

/// Raises this process's soft open-file limit to its hard limit (systemd gives services 1024
/// soft, 524288 hard) and returns the soft limit now in force; `None` when it cannot be read.
pub fn raise_open_files_limit() -> Option<u64> {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return None;
    }
    // macOS refuses a soft limit above OPEN_MAX even when the hard limit is "unlimited".
    #[cfg(target_os = "macos")]
    let target = l.rlim_max.min(libc::OPEN_MAX as libc::rlim_t);
    #[cfg(not(target_os = "macos"))]
    let target = l.rlim_max;
    if l.rlim_cur < target {
        let raised = libc::rlimit { rlim_cur: target, rlim_max: l.rlim_max };
        // SAFETY: setrlimit reads one rlimit through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            l.rlim_cur = target;
        }
    }
    Some(l.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_and_bad_pids() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX)); // -1 as pid_t would probe every process
        assert!(!pid_alive(i32::MAX as u32));
        assert!(signal(u32::MAX, 0).is_err());
    }

    #[test]
    fn memory_readings() {
        assert!(machine_memory_mb() > 0);
        assert!(process_memory_mb(std::process::id()).is_some());
        assert!(peak_memory_mb() > 0);
    }
}
