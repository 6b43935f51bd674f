//! The memory budget's rules, in one place: the machine's default, the floor and ceiling a job
//! file or config.toml may name, the share a running `rerankd serve` takes, the hard limit the
//! daemon's watchdog kills at, and how much a run's micro-batch shrinks after a death that may
//! have been the machine running out of memory. `train::memory` keeps only the arithmetic that
//! estimates what a step needs.

/// The least budget a job or the configuration may name, and the least a default falls to
/// however much `rerankd serve` holds.
pub const MIN_MB: u64 = 256;
/// The most a job or the configuration may name (1 TiB).
pub const MAX_MB: u64 = 1 << 20;

/// The default budget: half the machine, and never within 4 GB of all of it, so the desktop
/// keeps room whatever a job asks for (4 GB where the machine's memory cannot be read).
pub fn machine_default_mb() -> u64 {
    let total = crate::sys::machine_memory_mb();
    if total == 0 {
        return 4096;
    }
    (total / 2).min(total.saturating_sub(4096)).max(1024)
}

/// The default budget of new runs while `rerankd serve` holds `serve_mb` resident: both share one
/// machine, so serve's share comes off, down to [`MIN_MB`].
pub fn beside_serve_mb(default_mb: u64, serve_mb: u64) -> u64 {
    default_mb.saturating_sub(serve_mb).max(MIN_MB)
}

/// The memory past which the daemon kills a run with this budget: a quarter above it, and at least
/// 512 MB above (the estimate errs high, but allocators and the OS keep some slack).
pub fn hard_limit_mb(budget_mb: u64) -> u64 {
    (budget_mb + budget_mb / 4).max(budget_mb + 512)
}

/// The micro-batch of the next attempt after a death that may have been memory: at most 3/4 of
/// it, at least one row (the effective batch is kept by accumulating more micro-batches).
pub fn shrunk_micro_batch(micro: u64) -> u64 {
    (micro * 3 / 4).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules() {
        let (total, d) = (crate::sys::machine_memory_mb(), machine_default_mb());
        assert!(total == 0 || (d <= total / 2 + 1 && d >= 1024.min(total)), "{d} of {total}");
        assert_eq!(beside_serve_mb(8192, 2000), 6192);
        assert_eq!(beside_serve_mb(1000, 5000), MIN_MB);
        assert_eq!(hard_limit_mb(8192), 10240);
        assert_eq!(hard_limit_mb(1024), 1536);
        assert_eq!((shrunk_micro_batch(8), shrunk_micro_batch(2), shrunk_micro_batch(1)), (6, 1, 1));
    }
}
