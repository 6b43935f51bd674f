//! The one integration-test binary: every file under `tests/` is a module of it, so the suite
//! links once. Helpers live in `common` alone. A new integration test goes into the module of
//! what it tests (or a new module listed here).

mod common;

/// The command line's own surface: completions, the man page, `--json`, reports.
mod cli;
/// A root written by the code before the renovation still reads, serves and resumes.
mod compat;
/// The daemon as users drive it: the real binary, child processes, signals, intake.
mod daemon;
/// Loading checkpoints, adapter round trips, learning, shared prefixes (in process).
mod engine;
/// `rerankd export`: merged and seq-cls checkpoints that score as the adapter does.
mod export;
/// The fault suite: kills, full disks, hostile files, idle costs.
mod faults;
/// The feedback loop over HTTP: capture, signals, retraining by policy.
mod feedback;
/// The numerics against transformers + peft on the tiny fixture model.
mod fixture;
/// on_finish hooks.
mod hooks;
/// `rerankd serve` under hostile and careless clients: connections, origins, sizes.
mod hostile;
/// Damaged state never wins: sealed checkpoints and adapters.
mod integrity;
/// The layers docs/design.md states, checked on the source: no circles, nothing imported upward.
mod layers;
/// Learning you can trust: hard negatives, held-out lists, promotion.
mod learning;
/// The learning pipeline end to end through the daemon.
mod pipeline;
/// Property tests of every reader of user input.
mod props;
/// Checkpoints and resume, bitwise.
mod resume;
/// The spool as a directory, driven by the example scripts.
mod scripts;
/// `rerankd serve` over real HTTP.
mod serve;
