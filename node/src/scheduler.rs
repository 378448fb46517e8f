//! The scheduler: the node's job queue, the worker threads that run jobs in the sandbox, and the
//! load figures (queue length, moving-average service time) that offload decisions and status
//! reports read.
//!
//! Who calls it: the node's MQTT loop [`Scheduler::submit`]s every accepted job and awaits its
//! [`Outcome`]; each job gets exactly one outcome, an answer or an error, never silence.
//!
//! Workers are OS threads, not tokio tasks: a guest call blocks for tens of milliseconds. Each owns
//! one [`Instance`] of the current module; when the module slot changes, the worker builds a new
//! instance before its next job, and after a trap it throws its instance away.

use crate::slot::ModuleSlot;
use isomesh_mesh::outcome::{Answer, JobFailure, Outcome};
use isomesh_protos::{ClassScore, GuestClassification};
use isomesh_sandbox::{CallError, Instance, LoadedModule, Sandbox};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Weight of the newest sample in the service-time moving average.
const EWMA_ALPHA: f64 = 0.2;

/// Live load figures, shared with status reports and offload decisions.
#[derive(Debug, Default)]
pub struct Load {
    /// Jobs submitted and not yet finished (waiting or running).
    in_system: AtomicUsize,
    /// Moving average of the service time, microseconds; 0 until the first job.
    ewma_us: AtomicU64,
    /// Moving average of the service time's distance from `ewma_us`, microseconds (as TCP
    /// tracks RTT variation): how far one job may run past the average.
    deviation_us: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
}

impl Load {
    pub fn in_system(&self) -> usize {
        self.in_system.load(Ordering::Relaxed)
    }

    /// Moving-average service time of one job in milliseconds (0 before any job ran).
    pub fn ewma_ms(&self) -> f64 {
        self.ewma_us.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Moving-average deviation of the service time from [`Load::ewma_ms`], ms.
    pub fn deviation_ms(&self) -> f64 {
        self.deviation_us.load(Ordering::Relaxed) as f64 / 1000.0
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    fn record(&self, service: Duration) {
        let sample = service.as_micros() as f64;
        // Only workers update it, one sample at a time each: a lost update is harmless.
        let old = self.ewma_us.load(Ordering::Relaxed) as f64;
        let (new, deviation) = if old == 0.0 {
            (sample, 0.0)
        } else {
            let deviation = self.deviation_us.load(Ordering::Relaxed) as f64;
            (
                old + EWMA_ALPHA * (sample - old),
                deviation + EWMA_ALPHA * ((sample - old).abs() - deviation),
            )
        };
        self.ewma_us.store(new as u64, Ordering::Relaxed);
        self.deviation_us.store(deviation as u64, Ordering::Relaxed);
    }
}

struct Task {
    image: Vec<u8>,
    top_k: u32,
    /// The module the job must run on (`name@version`, version or sha256); empty = any.
    pin: String,
    submitted: Instant,
    /// The MQTT loop's task awaiting this job holds the other end.
    done: oneshot::Sender<Outcome>,
}

/// Handle to the queue and its workers. Dropping every handle lets the workers exit.
pub struct Scheduler {
    /// Workers hold the receiving end; taking this sender away is how they learn to stop.
    queue: Mutex<Option<crossbeam_channel::Sender<Task>>>,
    load: Arc<Load>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Scheduler {
    /// Starts `workers` threads running jobs on whatever module `slot` holds.
    pub fn start(
        workers: usize,
        sandbox: Arc<Sandbox>,
        slot: Arc<ModuleSlot>,
    ) -> std::io::Result<Scheduler> {
        let (queue, tasks) = crossbeam_channel::unbounded::<Task>();
        let load = Arc::new(Load::default());
        let mut handles = Vec::new();
        for n in 0..workers.max(1) {
            let worker = Worker {
                sandbox: sandbox.clone(),
                slot: slot.clone(),
                load: load.clone(),
                instance: None,
            };
            let tasks = tasks.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("worker-{n}"))
                    .spawn(move || worker.run(tasks))?,
            );
        }
        Ok(Scheduler {
            queue: Mutex::new(Some(queue)),
            load,
            workers: Mutex::new(handles),
        })
    }

    /// The live load figures.
    pub fn load(&self) -> Arc<Load> {
        self.load.clone()
    }

    /// Queues a job, to run on a module matching `pin` (empty: any); the returned receiver yields
    /// its one outcome.
    pub fn submit(&self, image: Vec<u8>, top_k: u32, pin: String) -> oneshot::Receiver<Outcome> {
        let (done, outcome) = oneshot::channel();
        self.load.in_system.fetch_add(1, Ordering::Relaxed);
        let task = Task {
            image,
            top_k,
            pin,
            submitted: Instant::now(),
            done,
        };
        let sent = match relock(&self.queue).clone() {
            Some(queue) => queue.send(task).map_err(|e| e.0),
            None => Err(task),
        };
        if let Err(task) = sent {
            self.load.in_system.fetch_sub(1, Ordering::Relaxed);
            let _ = task.done.send(Err(JobFailure::new(
                "the node is shutting down and runs no new jobs",
            )));
        }
        outcome
    }

    /// Stops taking jobs, lets the workers finish what is queued, and waits for them.
    /// Blocks: call it from a blocking thread.
    pub fn shutdown(&self) {
        drop(relock(&self.queue).take());
        let workers = std::mem::take(&mut *relock(&self.workers));
        for worker in workers {
            let _ = worker.join();
        }
    }
}

/// Locks `mutex`, recovering the data if a panicking thread poisoned it (the data stays valid).
fn relock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Worker {
    sandbox: Arc<Sandbox>,
    slot: Arc<ModuleSlot>,
    load: Arc<Load>,
    /// The instance this worker runs jobs on, with the module it was built from.
    instance: Option<(Arc<LoadedModule>, Instance)>,
}

impl Worker {
    fn run(mut self, tasks: crossbeam_channel::Receiver<Task>) {
        // Build the instance before the first job arrives, so that job does not pay for it.
        if let Some(module) = self.slot.current() {
            let _ = self.instance_for(&module);
        }
        while let Ok(task) = tasks.recv() {
            // A job that reached a node still loading its first module waits for it (and the
            // wait counts as time queued).
            self.slot.wait_started();
            let queued = task.submitted.elapsed();
            let outcome = self.run_one(&task, queued);
            match &outcome {
                Ok(answer) => {
                    self.load.record(answer.service);
                    self.load.done.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.load.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.load.in_system.fetch_sub(1, Ordering::Relaxed);
            // The receiver may be gone (its task was cancelled at shutdown): nothing to tell.
            let _ = task.done.send(outcome);
        }
    }

    fn run_one(&mut self, task: &Task, queued: Duration) -> Outcome {
        let Some(module) = self.slot.current() else {
            return Err(JobFailure::new(
                "no classifier module is installed on this node yet: roll one out with \
                 `isomesh rollout` or copy a .wasm into its module directory",
            ));
        };
        let fail = |message: String, module: &Arc<LoadedModule>| JobFailure {
            message,
            module: Some(Box::new(module.module_ref())),
        };
        if !module.matches(&task.pin) {
            return Err(fail(
                format!(
                    "the job is pinned to module {:?}; this node serves {}@{} (sha256 {})",
                    task.pin,
                    module.info.name,
                    module.info.version,
                    isomesh_module::digest::short(&module.sha256)
                ),
                &module,
            ));
        }
        let instance = self.instance_for(&module).map_err(|e| fail(e, &module))?;
        let started = Instant::now();
        let result = instance.classify(&task.image, task.top_k);
        let service = started.elapsed();
        match result {
            Ok(classification) => Ok(answer(&module, classification, queued, service)),
            Err(error) => {
                if error.poisons_instance() {
                    tracing::warn!(error = %error, "guest trapped; recycling its instance");
                    self.instance = None;
                }
                Err(fail(error.to_string(), &module))
            }
        }
    }

    /// This worker's instance of `module`, built if it has none or one of another module.
    fn instance_for(&mut self, module: &Arc<LoadedModule>) -> Result<&mut Instance, String> {
        let stale = !matches!(&self.instance, Some((m, _)) if Arc::ptr_eq(m, module));
        if stale {
            self.instance = None;
            let started = Instant::now();
            // After a swap the manager has built one instance per worker ahead of time.
            let instance = match module.take_warm() {
                Some(instance) => instance,
                None => self
                    .sandbox
                    .instantiate(module)
                    .map_err(|e: CallError| format!("cannot start the module: {e}"))?,
            };
            tracing::debug!(ms = started.elapsed().as_millis() as u64, "instance ready");
            self.instance = Some((module.clone(), instance));
        }
        match &mut self.instance {
            Some((_, instance)) => Ok(instance),
            None => Err("no instance".into()),
        }
    }
}

/// The answer to a job: the guest's classes with the module's labels, and the timings.
fn answer(
    module: &LoadedModule,
    classification: GuestClassification,
    queued: Duration,
    service: Duration,
) -> Answer {
    let labels = &module.info.labels;
    Answer {
        module: module.module_ref(),
        top: classification
            .top
            .iter()
            .map(|score| ClassScore {
                index: score.index,
                label: labels
                    .get(score.index as usize)
                    .cloned()
                    .unwrap_or_default(),
                prob: score.prob,
            })
            .collect(),
        decode_us: classification.decode_us,
        infer_us: classification.infer_us,
        queued,
        service,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_start_at_the_first_sample_and_move_toward_new_ones() {
        let load = Load::default();
        assert_eq!(load.ewma_ms(), 0.0);
        load.record(Duration::from_millis(100));
        assert_eq!(load.ewma_ms(), 100.0);
        load.record(Duration::from_millis(200));
        assert!((load.ewma_ms() - 120.0).abs() < 0.01);
        // |200 - 100| x 0.2
        assert!((load.deviation_ms() - 20.0).abs() < 0.01);
        load.record(Duration::from_millis(120));
        // 20 + 0.2 x (|120 - 120| - 20)
        assert!((load.deviation_ms() - 16.0).abs() < 0.01);
    }
}
