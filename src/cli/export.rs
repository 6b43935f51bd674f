//! `rerankd export`: a run's (or a corpus's promoted) adapter folded into its base model, written
//! as a standard Hugging Face checkpoint in a temporary directory renamed into place at the end.
//!
//! One export per destination at a time (`.<name>.export.lock` beside it, a lock file kept like
//! every lock); under it, temporary directories that killed exports left are removed first. Only
//! a completed run is exported unless `--force`. A destination that is a symlink to an empty
//! directory is written into its target. The files get the mode a file created there gets (the
//! umask's), all alike.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use rerankd::model::checkpoint::CheckpointDir;
use rerankd::model::export::{self, ExportInfo, ExportSpec, Format};
use rerankd::model::prompt::PromptBuilder;
use rerankd::store::{Root, models};
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    Merged,
    SeqCls,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    Bf16,
    F16,
    F32,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A completed run whose adapter to export.
    #[arg(required_unless_present = "corpus")]
    pub run: Option<String>,
    /// Export the corpus's promoted adapter instead.
    #[arg(long, conflicts_with = "run")]
    pub corpus: Option<String>,
    #[arg(long, value_enum)]
    pub format: FormatArg,
    /// A new (or empty) directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Default: the base checkpoint's own.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Export a run that did not complete (the adapter its last attempt left) all the same.
    #[arg(long)]
    pub force: bool,
    /// Largest weights file before splitting into shards with an index (HF's 5 GB by default).
    #[arg(long, hide = true, default_value_t = export::HF_MAX_SHARD_BYTES / 1_000_000)]
    pub max_shard_mb: u64,
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub fn run(root: &Root, a: ExportArgs) -> anyhow::Result<ExitCode> {
    let mut forced_from = None;
    let (run_id, adapter) = match (&a.run, &a.corpus) {
        (Some(run), _) => {
            let (files, st) = match super::find_run(root, run) {
                Ok(x) => x,
                Err(code) => return Ok(code),
            };
            if !files.adapter().join("adapter_model.safetensors").is_file() {
                super::complain(format!("run {run} ({}) has no adapter to export", st.state.as_str()));
                return Ok(ExitCode::from(super::EXIT_NOT_FOUND));
            }
            if st.state != rerankd::store::RunState::Completed && !a.force {
                super::complain(format!(
                    "run {run} is {}, not completed: its adapter is what an unfinished attempt left, not what the run \
                     earned; --force exports it all the same",
                    st.state.as_str()
                ));
                return Ok(ExitCode::from(super::EXIT_REFUSED));
            }
            if st.state != rerankd::store::RunState::Completed {
                forced_from = Some(st.state.as_str().to_string());
            }
            (st.run_id, files.adapter())
        }
        (None, Some(c)) => {
            let c = match super::check_corpus(c) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            match models::current(root, &c) {
                Some(x) => x,
                None => {
                    super::complain(format!("corpus `{c}` has no promoted adapter"));
                    return Ok(ExitCode::from(super::EXIT_NOT_FOUND));
                }
            }
        }
        (None, None) => unreachable!("clap requires one"),
    };
    // A symlink to a directory is written into its target (renaming onto the link would fail
    // after all the work).
    let out_arg = if a.out.is_dir() { std::fs::canonicalize(&a.out)? } else { a.out.clone() };
    if let Ok(mut d) = std::fs::read_dir(&out_arg) {
        if d.next().is_some() {
            super::complain(format!("{} is not empty; refusing to overwrite it", a.out.display()));
            return Ok(ExitCode::from(super::EXIT_REFUSED));
        }
    } else if a.out.exists() {
        super::complain(format!("{} exists and is not a directory", a.out.display()));
        return Ok(ExitCode::from(super::EXIT_REFUSED));
    }
    let opened = models::Adapter::open(&adapter)?;
    let manifest = opened.manifest.as_ref().context("the adapter has no manifest.json")?;
    let base = CheckpointDir::resolve(&manifest.model)?;
    let cfg = base.read_config()?;
    let lora = opened.lora(&cfg, &candle_core::Device::Cpu)?;
    let prompt = PromptBuilder::from_file(&base.tokenizer)?;
    let format = match a.format {
        FormatArg::Merged => Format::Merged,
        FormatArg::SeqCls => Format::SeqCls,
    };
    let dtype = a.dtype.map(|d| match d {
        DtypeArg::Bf16 => candle_core::DType::BF16,
        DtypeArg::F16 => candle_core::DType::F16,
        DtypeArg::F32 => candle_core::DType::F32,
    });
    // Built beside the destination and renamed at the end: an interrupted export leaves only a
    // hidden temporary directory, never something that looks complete (and the next export to
    // the same destination removes it).
    let out = std::path::absolute(&out_arg)?;
    let parent = out.parent().context("the output directory has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out.file_name().context("the output directory has no name")?.to_string_lossy().into_owned();
    let lock_path = parent.join(format!(".{name}.export.lock"));
    let Some(mut lock) = rerankd::store::FileLock::try_acquire(&lock_path)? else {
        let holder = rerankd::store::lock::holder_pid(&lock_path).map_or(String::new(), |p| format!(" (pid {p})"));
        super::complain(format!("another export to {} is running{holder}; wait for it", out.display()));
        return Ok(ExitCode::from(super::EXIT_REFUSED));
    };
    lock.write_pid()?;
    let stem = format!(".{name}.rerankd-export-");
    for e in std::fs::read_dir(parent).with_context(|| format!("listing {}", parent.display()))?.flatten() {
        if e.file_name().to_string_lossy().starts_with(&stem) {
            eprintln!("removing {}, left by an export that did not finish", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let tmp = parent.join(format!("{stem}{}", std::process::id()));
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = (|| -> anyhow::Result<export::Written> {
        let spec = ExportSpec {
            base: &base,
            lora: &lora,
            format,
            dtype,
            yes_id: prompt.yes_id,
            no_id: prompt.no_id,
            pad_id: prompt.pad_id,
            max_shard_bytes: a.max_shard_mb.max(1) * 1_000_000,
        };
        let mut written = export::write_weights(&spec, &tmp)?;
        written.files.extend(export::copy_tokenizer(&base, format, &tmp)?);
        let info = ExportInfo {
            run_id: run_id.to_string(),
            corpus: run_id.corpus().map(String::from),
            adapter_digest: sha256_file(&adapter.join("adapter_model.safetensors"))?,
            base_model: manifest.model.clone(),
            instruction: opened.scoring_instruction(),
            max_length: opened.scoring_max_length(),
            format: match format {
                Format::Merged => "merged".into(),
                Format::SeqCls => "seq-cls".into(),
            },
            dtype: written.dtype.clone(),
            metrics: serde_json::to_value(&manifest.metrics)?,
            primary_metric: manifest.primary_metric.clone(),
            forced_from: forced_from.clone(),
        };
        info.write(&tmp)?;
        std::fs::write(tmp.join("README.md"), info.model_card(format))?;
        written.files.extend([export::EXPORT_INFO.to_string(), "README.md".to_string()]);
        // Every file with the mode a new file gets here (README.md's): some writers create theirs
        // 0600, which a reader running as another user (a container) could not open.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.join("README.md"))?.permissions().mode() & 0o777;
        for f in &written.files {
            std::fs::set_permissions(tmp.join(f), std::fs::Permissions::from_mode(mode))?;
            std::fs::File::open(tmp.join(f)).and_then(|f| f.sync_all())?;
        }
        Ok(written)
    })();
    let written = match result {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let placed = (|| -> anyhow::Result<()> {
        if out.is_dir() {
            std::fs::remove_dir(&out).with_context(|| format!("replacing the empty {}", out.display()))?;
        }
        std::fs::rename(&tmp, &out).with_context(|| format!("renaming the export into {}", out.display()))?;
        rerankd::store::atomic::sync_dir(parent)?;
        Ok(())
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    drop(lock);
    println!(
        "{}",
        serde_json::json!({"out": out, "run_id": run_id, "format": a.format.to_possible_value().map(|v| v.get_name().to_string()),
            "dtype": written.dtype, "files": written.files, "tensors": written.tensors, "bytes": written.bytes,
            "peak_rss_mb": rerankd::sys::peak_memory_mb()})
    );
    Ok(ExitCode::SUCCESS)
}
