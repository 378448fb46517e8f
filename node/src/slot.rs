//! What a node serves right now, read by every job and every status: the [`ModuleSlot`] (the
//! module the next job runs on) and the [`RolloutBoard`] (what became of the newest module this
//! node heard of). Both are replaced as a whole, never edited in place, so a reader sees either
//! the old or the new value.
//!
//! A node connects before its first module is loaded (compiling one takes 10-20 s): while the
//! slot is *starting*, workers wait for it ([`ModuleSlot::wait_started`]) instead of answering
//! "no module", so the jobs that reach the node meanwhile are served once it is ready.

use isomesh_protos::rollout_state::Phase;
use isomesh_protos::{ModuleRef, RolloutState};
use isomesh_sandbox::LoadedModule;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The module currently served. Cheap to read; replaced as a whole.
#[derive(Default)]
pub struct ModuleSlot {
    current: RwLock<Option<Arc<LoadedModule>>>,
    /// Modules installed over another one (metrics: `isomesh_module_swaps_total`).
    swaps: std::sync::atomic::AtomicU64,
    /// True while the node loads the module it starts with; workers wait on `started`.
    starting: Mutex<bool>,
    started: Condvar,
}

impl ModuleSlot {
    /// The module to run the next job on, if any is installed.
    pub fn current(&self) -> Option<Arc<LoadedModule>> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Serves `module` from the next job on.
    pub fn install(&self, module: Arc<LoadedModule>) {
        let previous = match self.current.write() {
            Ok(mut guard) => guard.replace(module),
            Err(poisoned) => poisoned.into_inner().replace(module),
        };
        if previous.is_some() {
            self.swaps
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Marks the slot as starting: [`ModuleSlot::wait_started`] blocks until
    /// [`ModuleSlot::finish_start`].
    pub fn begin_start(&self) {
        *self.starting.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// The start is over (with a module installed or none): waiting workers go on.
    pub fn finish_start(&self) {
        *self.starting.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.started.notify_all();
    }

    /// Whether the node is still loading the module it starts with.
    pub fn is_starting(&self) -> bool {
        *self.starting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks the calling thread (a worker) while the node is starting.
    pub fn wait_started(&self) {
        let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        while *starting {
            starting = self
                .started
                .wait(starting)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// How many times a module replaced another since the node started.
    pub fn swaps(&self) -> u64 {
        self.swaps.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// What became of the newest module this node heard of; read by status reports. Setting it
/// wakes the status reporter so a swap or a rejection is public at once. Every phase a module
/// goes through is shown here, so the board also keeps the [`Tally`] the metrics report.
#[derive(Default)]
pub struct RolloutBoard {
    state: Mutex<Option<RolloutState>>,
    tally: Mutex<Tally>,
    /// The status reporter waits on it.
    pub changed: tokio::sync::Notify,
}

/// Counts and times of the phases shown on a [`RolloutBoard`] (metrics: `isomesh_rollout_*`,
/// `isomesh_module_load*`).
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Refusals by their code (`signature`, `load`, ...), each counted once when first shown.
    pub rejections: BTreeMap<String, u64>,
    /// Rollouts whose chunks all came in (fetching -> loading).
    pub fetched: u64,
    /// Modules that went from loading to serving, the one a node starts with included.
    pub loaded: u64,
    /// How long the last fetch took, from its first shown chunk count to loading.
    pub last_fetch: Option<Duration>,
    /// How long the last load took: compile (or cache), self-test and the workers' instances.
    pub last_load: Option<Duration>,
    /// The module and phase shown last, and since when.
    current: Option<(String, i32, Instant)>,
}

impl Tally {
    /// Takes note of `state` being shown at `now`.
    fn observe(&mut self, state: &RolloutState, now: Instant) {
        let sha256 = state
            .module
            .as_ref()
            .map(|m| m.sha256.clone())
            .unwrap_or_default();
        let previous = self
            .current
            .take()
            .filter(|(sha, _, _)| *sha == sha256)
            .map(|(_, phase, since)| (phase, since));
        let (fetching, loading, serving, rejected) = (
            Phase::Fetching as i32,
            Phase::Loading as i32,
            Phase::Serving as i32,
            Phase::Rejected as i32,
        );
        if let Some((phase, since)) = previous {
            if phase == state.phase {
                // The same phase again (a newer chunk count, a status shown twice): nothing new.
                self.current = Some((sha256, phase, since));
                return;
            }
            let took = now.duration_since(since);
            if phase == fetching && state.phase == loading {
                self.fetched += 1;
                self.last_fetch = Some(took);
            } else if phase == loading && state.phase == serving {
                self.loaded += 1;
                self.last_load = Some(took);
            }
        }
        if state.phase == rejected {
            *self.rejections.entry(state.code.clone()).or_default() += 1;
        }
        self.current = Some((sha256, state.phase, now));
    }
}

impl RolloutBoard {
    /// Shows `state` from now on.
    pub fn show(&self, state: RolloutState) {
        self.tally
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(&state, Instant::now());
        match self.state.lock() {
            Ok(mut guard) => *guard = Some(state),
            Err(poisoned) => *poisoned.into_inner() = Some(state),
        }
        self.changed.notify_one();
    }

    /// The module the node started with serves: counted and timed like any load, and then the
    /// board is empty again (it tells of rollouts, and none has come yet).
    pub fn started(&self, module: ModuleRef) {
        self.tally
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(
                &RolloutState {
                    module: Some(module),
                    phase: Phase::Serving as i32,
                    ..Default::default()
                },
                Instant::now(),
            );
        match self.state.lock() {
            Ok(mut guard) => *guard = None,
            Err(poisoned) => *poisoned.into_inner() = None,
        }
        self.changed.notify_one();
    }

    /// The counts and times so far.
    pub fn tally(&self) -> Tally {
        self.tally.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Shows `module` in `phase`, with no chunk counts and no reason.
    pub fn set(&self, module: ModuleRef, phase: Phase) {
        self.show(RolloutState {
            module: Some(module),
            phase: phase as i32,
            ..Default::default()
        });
    }

    pub fn get(&self) -> Option<RolloutState> {
        match self.state.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(sha256: &str, phase: Phase, code: &str) -> RolloutState {
        RolloutState {
            module: Some(ModuleRef {
                sha256: sha256.into(),
                ..Default::default()
            }),
            phase: phase as i32,
            code: code.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_tally_times_fetches_and_loads_and_counts_each_refusal_once() {
        let mut tally = Tally::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // A module the node starts with: loading, then serving.
        tally.observe(&shown("a", Phase::Loading, ""), at(0));
        tally.observe(&shown("a", Phase::Serving, ""), at(900));
        assert_eq!((tally.loaded, tally.fetched), (1, 0));
        assert_eq!(tally.last_load, Some(Duration::from_millis(900)));
        // A rollout: chunk counts move (the same phase), then loading, then serving.
        tally.observe(&shown("b", Phase::Fetching, ""), at(1000));
        tally.observe(&shown("b", Phase::Fetching, ""), at(1200));
        tally.observe(&shown("b", Phase::Loading, ""), at(1500));
        tally.observe(&shown("b", Phase::Serving, ""), at(1800));
        assert_eq!((tally.loaded, tally.fetched), (2, 1));
        assert_eq!(tally.last_fetch, Some(Duration::from_millis(500)));
        assert_eq!(tally.last_load, Some(Duration::from_millis(300)));
        // A refusal shown twice counts once; another module's refusal counts again.
        tally.observe(&shown("c", Phase::Rejected, "signature"), at(2000));
        tally.observe(&shown("c", Phase::Rejected, "signature"), at(2100));
        tally.observe(&shown("d", Phase::Rejected, "signature"), at(2200));
        tally.observe(&shown("e", Phase::Loading, ""), at(2300));
        tally.observe(&shown("e", Phase::Rejected, "load"), at(2400));
        assert_eq!(tally.rejections.get("signature"), Some(&2));
        assert_eq!(tally.rejections.get("load"), Some(&1));
        // Serving shown without loading first (a status shown again) is no load.
        tally.observe(&shown("b", Phase::Serving, ""), at(2500));
        assert_eq!(tally.loaded, 2);
    }

    #[test]
    fn workers_wait_for_the_start_and_no_longer() {
        let slot = Arc::new(ModuleSlot::default());
        slot.wait_started(); // never started: returns at once
        slot.begin_start();
        assert!(slot.is_starting());
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let slot = slot.clone();
            std::thread::spawn(move || {
                slot.wait_started();
                tx.send(()).unwrap();
            })
        };
        // Still waiting a while later.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err());
        slot.finish_start();
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the worker went on");
        waiter.join().unwrap();
        assert!(!slot.is_starting());
    }
}
