//! `metrics.jsonl`: the append-only event log of a run. One JSON object per line, written with a
//! single `write` of the whole line, numbered by `seq`. A torn last line (a crash mid-write) is
//! truncated when the log is reopened and skipped by every reader.

use crate::ids::RunId;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::status::RunState;
use super::time::now_rfc3339;
use super::{Result, StoreError};

pub struct MetricsLog {
    file: File,
    path: PathBuf,
    run_id: RunId,
    next_seq: u64,
    /// Bytes of complete lines in the file: where a torn write is cut back to.
    len: u64,
    /// The last `state` event that was terminal, if the log has one: a state recorded in the
    /// log but perhaps not yet in status.json (see `status::record`).
    terminal: Option<Value>,
}

impl MetricsLog {
    /// Opens (creating) the log, cutting a torn last line and continuing the `seq` numbering.
    pub fn open(path: &Path, run_id: &RunId) -> Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(StoreError::io(path, "reading", e)),
        };
        let good = bytes.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
        let events = parse_lines(&bytes[..good]);
        let next_seq = events.len() as u64;
        let terminal = terminal_state(&events).cloned();
        let file =
            OpenOptions::new().create(true).append(true).open(path).map_err(|e| StoreError::io(path, "opening", e))?;
        if good < bytes.len() {
            file.set_len(good as u64).map_err(|e| StoreError::io(path, "truncating a torn line", e))?;
        }
        Ok(Self { file, path: path.to_path_buf(), run_id: run_id.clone(), next_seq, len: good as u64, terminal })
    }

    /// Appends one event of `kind` with `fields`; `ts`, `seq`, `run_id` and `type` are added.
    pub fn append(&mut self, kind: &str, fields: Value) -> Result<()> {
        let mut obj = Map::new();
        obj.insert("ts".into(), now_rfc3339().into());
        obj.insert("seq".into(), self.next_seq.into());
        obj.insert("run_id".into(), self.run_id.clone().into());
        obj.insert("type".into(), kind.into());
        if let Value::Object(f) = fields {
            obj.extend(f);
        }
        let event = Value::Object(obj);
        let mut line = event.to_string();
        line.push('\n');
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            // A short write (disk full) leaves a torn line: cut it now (best effort), so the next
            // append starts on a line of its own (readers skip torn lines either way).
            let _ = self.file.set_len(self.len);
            return Err(StoreError::io(&self.path, "appending", e));
        }
        self.file.flush().map_err(|e| StoreError::io(&self.path, "flushing", e))?;
        self.next_seq += 1;
        self.len += line.len() as u64;
        if is_terminal_state(&event) {
            self.terminal = Some(event);
        }
        Ok(())
    }

    /// The terminal `state` event this log holds, if any.
    pub fn terminal(&self) -> Option<&Value> {
        self.terminal.as_ref()
    }

    /// Makes everything appended so far durable (used at state changes).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| StoreError::io(&self.path, "syncing", e))
    }
}

fn parse_lines(bytes: &[u8]) -> Vec<Value> {
    bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).filter_map(|l| serde_json::from_slice(l).ok()).collect()
}

/// Whether an event is a `state` event naming a terminal state.
fn is_terminal_state(e: &Value) -> bool {
    e["type"] == "state" && e["state"].as_str().and_then(RunState::parse).is_some_and(RunState::is_terminal)
}

/// The log's terminal `state` event, if the last `state` event is one.
pub fn terminal_state(events: &[Value]) -> Option<&Value> {
    events.iter().rev().find(|e| e["type"] == "state").filter(|e| is_terminal_state(e))
}

/// Every complete event of a log (a torn or garbled line is skipped).
pub fn read_events(path: &Path) -> Result<Vec<Value>> {
    match std::fs::read(path) {
        Ok(b) => Ok(parse_lines(&b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::io(path, "reading", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn torn_line_is_cut_on_reopen_and_seq_continues() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&p, &RunId::parse("r1").unwrap()).unwrap();
        log.append("log", json!({"level": "info", "message": "a"})).unwrap();
        log.append("log", json!({"level": "info", "message": "b"})).unwrap();
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"ts\": \"2026-").unwrap();
        drop(f);
        assert_eq!(read_events(&p).unwrap().len(), 2);
        let mut log = MetricsLog::open(&p, &RunId::parse("r1").unwrap()).unwrap();
        log.append("log", json!({"level": "info", "message": "c"})).unwrap();
        let ev = read_events(&p).unwrap();
        assert_eq!(ev.iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(ev[2]["message"], "c");
        assert!(std::fs::read_to_string(&p).unwrap().ends_with("}\n"));
    }
}
