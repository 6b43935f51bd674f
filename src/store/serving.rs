//! `ROOT/serve.json` and `ROOT/serve.lock`: what a running `rerankd serve` says about itself (pid,
//! addresses, resident memory, the adapters it serves), for the daemon's memory budget and for
//! `doctor`. The lock is the truth about whether serve is up; the file is its description.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::atomic::{read_json, write_json};
use super::{Result, Root, lock};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServeInfo {
    pub pid: u32,
    /// `http://ADDR:PORT` as bound (the real port when asked for port 0).
    pub listen: Option<String>,
    pub socket: Option<String>,
    /// Resident memory of the serve process when it last wrote this file.
    pub rss_mb: u64,
    pub started_at: String,
    pub updated_at: String,
    /// corpus -> the adapter it serves (`run_id`, or `base`).
    pub adapters: BTreeMap<String, String>,
    /// corpus -> why its promoted adapter is not the one served, when it failed to load.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub load_errors: BTreeMap<String, String>,
}

impl ServeInfo {
    pub fn write(&self, root: &Root) -> Result<()> {
        write_json(&root.serve_json(), self)
    }
}

/// The running serve's description: `Some` only while a process holds `serve.lock`.
pub fn live(root: &Root) -> Option<ServeInfo> {
    if !lock::is_held(&root.serve_lock()).unwrap_or(false) {
        return None;
    }
    read_json(&root.serve_json()).ok()
}

/// Resident memory of the running serve, measured now from its pid (falling back to what it
/// last wrote): the share of the machine that training budgets must leave to it.
pub fn resident_mb(root: &Root) -> Option<(u32, u64)> {
    let info = live(root)?;
    let measured = crate::sys::process_memory_mb(info.pid).filter(|&mb| mb > 0);
    Some((info.pid, measured.unwrap_or(info.rss_mb)))
}
