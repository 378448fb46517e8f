//! Watching the module directory: every complete new `.wasm` file is handed to the module manager.
//!
//! Files arrive three ways: renamed into place by this node's rollout agent (complete at once),
//! `mv`ed in by an operator (also a rename), or copied in (`cp`, written over time). A file is
//! reported when it is known to be whole: right after it is renamed into the directory or closed
//! after writing (inotify's `IN_MOVED_TO` and `IN_CLOSE_WRITE`), or after a quiet spell with no
//! further change for other kinds of event, so a half-written file is never loaded.

use isomesh_module::store::is_module_file;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Wait after a rename or a close-after-write: lets a burst of events for one file settle.
const SETTLE: Duration = Duration::from_millis(30);
/// Wait after any other change: long enough that a copy in progress writes again first.
const QUIET: Duration = Duration::from_secs(2);

/// Keeps the watch alive; dropping it stops the watch.
pub struct DirWatcher {
    _watcher: notify::RecommendedWatcher,
}

/// Watches `dir` and sends each complete `.wasm` file that appears or changes to `found`.
pub fn watch<T: From<PathBuf> + Send + 'static>(
    dir: &Path,
    found: mpsc::Sender<T>,
) -> notify::Result<DirWatcher> {
    let (events_tx, events) = mpsc::channel::<(PathBuf, bool)>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, "module directory watch error");
                return;
            }
        };
        let complete = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => true,
            EventKind::Create(_) | EventKind::Modify(_) => false,
            _ => return,
        };
        // With `Both`, the last path is the new name.
        let paths: Vec<PathBuf> = match event.kind {
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                event.paths.last().cloned().into_iter().collect()
            }
            _ => event.paths,
        };
        for path in paths {
            if is_module_file(&path) {
                let _ = events_tx.send((path, complete));
            }
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    std::thread::Builder::new()
        .name("module-watch".into())
        .spawn(move || settle(events, found))
        .map_err(|e| notify::Error::generic(&format!("starting the watcher thread: {e}")))?;
    Ok(DirWatcher { _watcher: watcher })
}

/// Holds each path until its events settle, then reports it once.
fn settle<T: From<PathBuf>>(events: mpsc::Receiver<(PathBuf, bool)>, found: mpsc::Sender<T>) {
    let mut pending: HashMap<PathBuf, Instant> = HashMap::new();
    loop {
        let next_due = pending.values().min().copied();
        let event = match next_due {
            Some(due) => events.recv_timeout(due.saturating_duration_since(Instant::now())),
            None => events
                .recv()
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match event {
            Ok((path, complete)) => {
                let wait = if complete { SETTLE } else { QUIET };
                pending.insert(path, Instant::now() + wait);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let due: Vec<PathBuf> = pending
            .iter()
            .filter(|(_, when)| **when <= now)
            .map(|(path, _)| path.clone())
            .collect();
        for path in due {
            pending.remove(&path);
            if path.is_file() && found.send(path.into()).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renamed_and_copied_files_are_reported_once_complete() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let _watch = watch(dir.path(), tx).unwrap();
        // A rename: reported quickly.
        let tmp = dir.path().join(".incoming.tmp");
        std::fs::write(&tmp, b"\0asm").unwrap();
        std::fs::rename(&tmp, dir.path().join("a.wasm")).unwrap();
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, dir.path().join("a.wasm"));
        // A non-module file: never reported.
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        // A written file: reported after it is closed.
        std::fs::write(dir.path().join("b.wasm"), b"\0asm").unwrap();
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, dir.path().join("b.wasm"));
        // Reported once: a second report would come from a non-close event (the create or a
        // write), only after the QUIET spell, so wait past it.
        if let Ok(again) = rx.recv_timeout(QUIET + Duration::from_millis(500)) {
            panic!("{} reported again", again.display());
        }
    }
}
