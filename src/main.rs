//! The `rerankd` binary: thin glue from the command line to the library. Exit codes are chosen
//! here, in one place (see docs/operations.md, "Exit codes").

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    tune_allocator();
    // Output piped into `head` ends quietly, as command-line tools do, instead of panicking.
    // SAFETY: restoring the default disposition of SIGPIPE has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            if cli::json() {
                eprintln!("{}", serde_json::json!({"error": format!("{e:#}")}));
            } else {
                eprintln!("rerankd: error: {e:#}");
            }
            ExitCode::from(cli::EXIT_FAILURE)
        }
    }
}

/// Training allocates and frees hundreds of MB of activations per step. glibc serves blocks above
/// its (adaptive) mmap threshold with fresh mappings and trims freed memory back to the kernel, so
/// every step pays page faults again: 5.9 s vs 3.8 s per 0.6B micro-step here (`rerankd bench`).
/// Keep such blocks in the heap instead. Other platforms' allocators keep their own policies.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
