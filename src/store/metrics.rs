//! `metrics.jsonl`: the append-only event log of a run. One JSON object per line, written with a
//! single `write` of the whole line, numbered by `seq`. A torn last line (a crash mid-write) is
//! truncated when the log is reopened and skipped by every reader.

use crate::ids::RunId;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::events::{Event, Logged};
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
    terminal: Option<Logged>,
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
        let complete = &bytes[..good];
        // One pass: every complete JSON line took a `seq`, whether this build knows its shape or
        // not; the last `state` event is kept to see whether the log already holds an end.
        let (mut next_seq, mut last_state) = (0u64, None);
        for l in lines(complete) {
            match serde_json::from_slice::<Logged>(l) {
                Ok(e) => {
                    next_seq += 1;
                    if e.event.state().is_some() {
                        last_state = Some(e);
                    }
                }
                Err(_) if serde_json::from_slice::<serde::de::IgnoredAny>(l).is_ok() => next_seq += 1,
                Err(_) => {}
            }
        }
        let terminal = last_state.filter(|e| e.event.is_terminal_state());
        let file =
            OpenOptions::new().create(true).append(true).open(path).map_err(|e| StoreError::io(path, "opening", e))?;
        if good < bytes.len() {
            file.set_len(good as u64).map_err(|e| StoreError::io(path, "truncating a torn line", e))?;
        }
        Ok(Self { file, path: path.to_path_buf(), run_id: run_id.clone(), next_seq, len: good as u64, terminal })
    }

    /// Appends one event, numbered and stamped (`ts`, `seq`, `run_id`).
    pub fn append(&mut self, event: Event) -> Result<()> {
        let logged = Logged { ts: now_rfc3339(), seq: self.next_seq, run_id: self.run_id.to_string(), event };
        let mut line = serde_json::to_string(&logged)
            .map_err(|e| StoreError::Corrupt { path: self.path.clone(), message: format!("an event: {e}") })?;
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
        if logged.event.is_terminal_state() {
            self.terminal = Some(logged);
        }
        Ok(())
    }

    /// The terminal `state` event this log holds, if any.
    pub fn terminal(&self) -> Option<&Logged> {
        self.terminal.as_ref()
    }

    /// Makes everything appended so far durable (used at state changes).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| StoreError::io(&self.path, "syncing", e))
    }
}

fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty())
}

fn parse_lines(bytes: &[u8]) -> Vec<Logged> {
    lines(bytes).filter_map(|l| serde_json::from_slice(l).ok()).collect()
}

/// The log's terminal `state` event, if the last `state` event is one.
pub fn terminal_state(events: &[Logged]) -> Option<&Logged> {
    events.iter().rev().find(|e| e.event.state().is_some()).filter(|e| e.event.is_terminal_state())
}

/// Every complete event of a log (a torn or garbled line is skipped).
pub fn read_events(path: &Path) -> Result<Vec<Logged>> {
    match std::fs::read(path) {
        Ok(b) => Ok(parse_lines(&b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::io(path, "reading", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::events::Log;

    #[test]
    fn torn_line_is_cut_on_reopen_and_seq_continues() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&p, &RunId::parse("r1").unwrap()).unwrap();
        log.append(Event::Log(Log::info("a"))).unwrap();
        log.append(Event::Log(Log::info("b"))).unwrap();
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"ts\": \"2026-").unwrap();
        drop(f);
        assert_eq!(read_events(&p).unwrap().len(), 2);
        let mut log = MetricsLog::open(&p, &RunId::parse("r1").unwrap()).unwrap();
        log.append(Event::Log(Log::info("c"))).unwrap();
        let ev = read_events(&p).unwrap();
        assert_eq!(ev.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(matches!(&ev[2].event, Event::Log(l) if l.message == "c"));
        assert!(std::fs::read_to_string(&p).unwrap().ends_with("}\n"));
    }
}
