//! What a node serves right now, read by every job and every status: the [`ModuleSlot`] (the
//! module the next job runs on) and the [`RolloutBoard`] (what became of the newest module this
//! node heard of). Both are replaced as a whole, never edited in place, so a reader sees either
//! the old or the new value.

use isomesh_protos::rollout_state::Phase;
use isomesh_protos::{ModuleRef, RolloutState};
use isomesh_sandbox::LoadedModule;
use std::sync::{Arc, Mutex, RwLock};

/// The module currently served. Cheap to read; replaced as a whole.
#[derive(Default)]
pub struct ModuleSlot {
    current: RwLock<Option<Arc<LoadedModule>>>,
    /// Modules installed over another one (metrics: `isomesh_module_swaps_total`).
    swaps: std::sync::atomic::AtomicU64,
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

    /// How many times a module replaced another since the node started.
    pub fn swaps(&self) -> u64 {
        self.swaps.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// What became of the newest module this node heard of; read by status reports. Setting it
/// wakes the status reporter so a swap or a rejection is public at once.
#[derive(Default)]
pub struct RolloutBoard {
    state: Mutex<Option<RolloutState>>,
    /// The status reporter waits on it.
    pub changed: tokio::sync::Notify,
}

impl RolloutBoard {
    /// Shows `state` from now on.
    pub fn show(&self, state: RolloutState) {
        match self.state.lock() {
            Ok(mut guard) => *guard = Some(state),
            Err(poisoned) => *poisoned.into_inner() = Some(state),
        }
        self.changed.notify_one();
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
