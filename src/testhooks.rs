//! Test-only fault injection, in one place. Each hook is an environment variable that the test
//! suite sets on the process it starts; nothing here is read unless that variable is set, and
//! none of them may be set outside tests (docs/guarantees.md lists them so an operator can check).
//!
//! - `RERANKD_TEST_CRASH_AT=<point>`: the process kills itself with SIGKILL when it reaches the
//!   named crash point (a real, uncatchable death at an exact step: intake, recording a state,
//!   promotion). The points are the string literals passed to [`crash_point`]; `<point>#<n>`
//!   dies at the n-th time the process reaches it (the third checkpoint, say).
//! - `RERANKD_TEST_IGNORE_CANCEL`: a run neither checks its cancel sentinel nor obeys SIGTERM, so
//!   tests can prove the daemon's escalation.
//! - `RERANKD_TEST_ALLOC_MB=<n>`: a run allocates and touches n MB and keeps them, so tests can
//!   prove the daemon's hard memory limit.
//! - `RERANKD_TEST_STEP_SLEEP_MS=<n>`: a run sleeps n ms before each micro-step, so the fault
//!   suite can kill it mid-training at leisure on a fast fixture model.
//! - `RERANKD_TEST_SCORE_SLEEP_MS=<n>`: `rerankd serve` sleeps n ms before each scoring forward,
//!   so tests can fill its queue and hold a request in flight on a fast fixture model.

pub const CRASH_AT_ENV: &str = "RERANKD_TEST_CRASH_AT";
pub const IGNORE_CANCEL_ENV: &str = "RERANKD_TEST_IGNORE_CANCEL";
pub const ALLOC_MB_ENV: &str = "RERANKD_TEST_ALLOC_MB";
pub const STEP_SLEEP_MS_ENV: &str = "RERANKD_TEST_STEP_SLEEP_MS";
pub const SCORE_SLEEP_MS_ENV: &str = "RERANKD_TEST_SCORE_SLEEP_MS";
/// A file every skipped test appends a line to (`.ci/run` prints it at the end).
pub const SKIPPED_ENV: &str = "RERANKD_SKIPPED";
/// Comma-separated capabilities a test may not skip for lack of (`amx`, `jq`, ...): `.ci/run`
/// requires what the machine has, so a skip there is a failure.
pub const REQUIRE_ENV: &str = "RERANKD_REQUIRE";

/// The fault hooks set in this process's environment (none outside tests): the daemon and serve
/// log them at start, and `doctor` reports them, so a hook left in a service's environment is seen.
pub fn active() -> Vec<&'static str> {
    [CRASH_AT_ENV, IGNORE_CANCEL_ENV, ALLOC_MB_ENV, STEP_SLEEP_MS_ENV, SCORE_SLEEP_MS_ENV]
        .into_iter()
        .filter(|v| std::env::var_os(v).is_some())
        .collect()
}

/// A test that cannot exercise its subject here says so, visibly: a `SKIPPED` line on stderr and
/// in the file `RERANKD_SKIPPED` names, or a panic if `RERANKD_REQUIRE` lists `needs`.
pub fn skipped(test: &str, needs: &str, why: &str) {
    let line = format!("SKIPPED {test} (needs {needs}): {why}");
    let required = std::env::var(REQUIRE_ENV).unwrap_or_default();
    if required.split(',').any(|r| r.trim() == needs) {
        panic!("{line}, but {REQUIRE_ENV} requires {needs}");
    }
    eprintln!("{line}");
    if let Some(path) = std::env::var_os(SKIPPED_ENV) {
        use std::io::Write;
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        if let Ok(mut f) = file {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Dies at once (SIGKILL to itself) if `RERANKD_TEST_CRASH_AT` names this point (and, with
/// `#n`, this is the n-th time it is reached).
pub fn crash_point(point: &str) {
    static HITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Some(v) = std::env::var_os(CRASH_AT_ENV) else { return };
    let v = v.to_string_lossy();
    let (name, nth) = match v.split_once('#') {
        Some((n, k)) => (n, k.parse::<usize>().unwrap_or(1)),
        None => (v.as_ref(), 1),
    };
    if name == point && HITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == nth {
        let _ = crate::sys::signal(std::process::id(), libc::SIGKILL);
        // SIGKILL to oneself is delivered before kill(2) returns; this is never reached.
        std::process::abort();
    }
}

pub fn ignore_cancel() -> bool {
    std::env::var_os(IGNORE_CANCEL_ENV).is_some()
}

/// `RERANKD_TEST_ALLOC_MB=<n>`: n MB at the run's start. (`<n>@<step>` allocates them at that
/// optimizer step instead: [`alloc_at_step`].)
pub fn alloc_mb() -> Option<usize> {
    std::env::var(ALLOC_MB_ENV).ok().and_then(|v| v.parse().ok())
}

/// With `RERANKD_TEST_ALLOC_MB=<n>@<step>`: allocates and touches n MB, kept for the process's
/// life, when training reaches that step from an earlier one in this process (`first`: the step it
/// started at), so an attempt resumed at that step does not (a run that grows past its memory
/// limit once, after it made progress).
pub fn alloc_at_step(step: usize, first: usize) {
    if step == first {
        return;
    }
    static KEPT: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
    let Ok(v) = std::env::var(ALLOC_MB_ENV) else { return };
    let Some((mb, at)) = v.split_once('@') else { return };
    if at.parse() == Ok(step)
        && let Ok(mb) = mb.parse::<usize>()
    {
        KEPT.lock().unwrap_or_else(|e| e.into_inner()).push(vec![1u8; mb << 20]);
    }
}

/// Sleeps before a micro-step if `RERANKD_TEST_STEP_SLEEP_MS` is set.
pub fn step_sleep() {
    sleep_from(STEP_SLEEP_MS_ENV);
}

/// Sleeps before a serve scoring forward if `RERANKD_TEST_SCORE_SLEEP_MS` is set.
pub fn score_sleep() {
    sleep_from(SCORE_SLEEP_MS_ENV);
}

fn sleep_from(var: &str) {
    if let Some(ms) = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms.min(60_000)));
    }
}
