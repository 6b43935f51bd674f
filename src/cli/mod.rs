//! Command-line parsing into plain structs, and dispatch: one file per subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod score;

/// The command failed (bad input, I/O, a model that would not load).
pub const EXIT_FAILURE: u8 = 1;

#[derive(Parser, Debug)]
#[command(name = "rerankd", version, about = "Fine-tune a Qwen3 reranker on your own relevance feedback")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Score documents against a query with a model (and optionally a LoRA adapter).
    Score(score::ScoreArgs),
    /// Time LoRA training micro-steps and scoring on random weights of a config.
    Bench(bench::BenchArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Score(a) => score::run(a),
        Command::Bench(a) => bench::run(a),
    }
}
