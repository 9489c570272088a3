//! One pinned thread per CPU, and the process-wide stop signal.
//!
//! [`spawn_workers`] starts one OS thread per requested CPU, pins it, and runs
//! the same closure on each with a [`WorkerCtx`] saying which worker it is.
//! Workers share nothing on the hot path: each builds its own `mio::Poll`,
//! listeners (with `SO_REUSEPORT`), connection table, timers and stats, and
//! returns its per-thread result (e.g. its stats) through [`Workers::join`].
//!
//! [`StopSignal`] is an `Arc<AtomicBool>` set by SIGINT/SIGTERM (via
//! signal-hook, async-signal-safe) or by [`StopSignal::stop`]. Event loops read
//! it once per iteration (a relaxed load, not per message) and must therefore
//! poll with a bounded timeout (see [`STOP_POLL_INTERVAL`]) so a signal is
//! noticed promptly. A second SIGINT while stopping exits the process at once
//! (status 130), so a wedged run can always be interrupted.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

use super::affinity;

/// The longest an event loop should block in `poll` so that a stop request
/// (which cannot wake the poll from a signal handler) is seen promptly.
pub const STOP_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Errors starting or joining workers.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// `Cpus::Count(0)` or an empty CPU list.
    #[error("at least one worker thread is needed")]
    NoWorkers,
    /// A CPU in the list is not one this process may run on.
    #[error("CPU {cpu} is not available to this process (available: {available})")]
    CpuUnavailable {
        /// The CPU asked for.
        cpu: usize,
        /// The CPUs we may use, as a list.
        available: String,
    },
    /// The OS refused to create a thread.
    #[error("cannot spawn worker thread {index}: {source}")]
    Spawn {
        /// Worker index.
        index: usize,
        /// The OS error.
        source: io::Error,
    },
    /// A worker panicked; the message is the panic payload if it was a string.
    #[error("worker thread {index} panicked: {message}")]
    Panicked {
        /// Worker index.
        index: usize,
        /// The panic message.
        message: String,
    },
}

/// How many workers to run, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cpus {
    /// `n` workers pinned round-robin over the available CPUs.
    Count(usize),
    /// One worker per listed CPU, pinned to it (`--cpus 0,2-3`).
    List(Vec<usize>),
}

impl Cpus {
    /// At most `n` workers (at least one): a list keeps its first `n` CPUs.
    pub fn at_most(self, n: usize) -> Self {
        let n = n.max(1);
        match self {
            Cpus::Count(c) => Cpus::Count(c.min(n)),
            Cpus::List(mut l) => {
                l.truncate(n);
                Cpus::List(l)
            }
        }
    }

    /// One worker per available CPU (at least one).
    pub fn all() -> Self {
        Cpus::Count(affinity::available_cores().len().max(1))
    }

    /// The CPU each worker is pinned to (`None`: run unpinned, because the OS
    /// does not report CPUs). Validates a list against the available CPUs.
    pub fn plan(&self) -> Result<Vec<Option<usize>>, RuntimeError> {
        let available = affinity::available_cores();
        match self {
            Cpus::Count(0) => Err(RuntimeError::NoWorkers),
            Cpus::Count(n) if available.is_empty() => Ok(vec![None; *n]),
            Cpus::Count(n) => Ok((0..*n)
                .map(|i| Some(available[i % available.len()]))
                .collect()),
            Cpus::List(list) if list.is_empty() => Err(RuntimeError::NoWorkers),
            Cpus::List(list) => {
                if !available.is_empty() {
                    if let Some(&cpu) = list.iter().find(|c| !available.contains(c)) {
                        let available = available
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(",");
                        return Err(RuntimeError::CpuUnavailable { cpu, available });
                    }
                }
                Ok(list.iter().map(|&c| Some(c)).collect())
            }
        }
    }
}

/// What a worker knows about itself.
#[derive(Clone, Debug)]
pub struct WorkerCtx {
    /// 0-based worker index (use it to split work: connections, rate, ports).
    pub index: usize,
    /// Number of workers.
    pub count: usize,
    /// The CPU this worker was asked to run on (`None`: unpinned).
    pub core: Option<usize>,
    /// True if pinning to `core` succeeded.
    pub pinned: bool,
    /// The stop signal shared by all workers.
    pub stop: StopSignal,
}

/// Handles of running workers.
#[derive(Debug)]
pub struct Workers<T> {
    handles: Vec<JoinHandle<T>>,
}

impl<T> Workers<T> {
    /// Number of workers.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// True if there are no workers (never, from [`spawn_workers`]).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Waits for every worker and returns their results in index order. If a
    /// worker panicked, the remaining ones are still joined and the first
    /// panic is returned as an error.
    pub fn join(self) -> Result<Vec<T>, RuntimeError> {
        let mut results = Vec::with_capacity(self.handles.len());
        let mut first_error = None;
        for (index, handle) in self.handles.into_iter().enumerate() {
            match handle.join() {
                Ok(value) => results.push(value),
                Err(payload) => {
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic payload".to_string());
                    first_error.get_or_insert(RuntimeError::Panicked { index, message });
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(results),
        }
    }
}

/// Starts one thread per planned CPU (see [`Cpus::plan`]), named
/// `{name}-{index}`, pinned, each running `f(ctx)`.
///
/// If a later thread fails to spawn, `stop` is set so the ones already
/// running wind down, and the error is returned (the caller should not wait
/// on them: they see the stop flag within one loop iteration).
pub fn spawn_workers<T, F>(
    cpus: &Cpus,
    name: &str,
    stop: &StopSignal,
    f: F,
) -> Result<Workers<T>, RuntimeError>
where
    T: Send + 'static,
    F: Fn(WorkerCtx) -> T + Send + Sync + 'static,
{
    let plan = cpus.plan()?;
    let count = plan.len();
    let f = Arc::new(f);
    let mut handles = Vec::with_capacity(count);
    for (index, core) in plan.into_iter().enumerate() {
        let f = Arc::clone(&f);
        let stop_for_worker = stop.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-{index}"))
            .spawn(move || {
                let pinned = core.is_some_and(affinity::pin_current);
                f(WorkerCtx {
                    index,
                    count,
                    core,
                    pinned,
                    stop: stop_for_worker,
                })
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(source) => {
                stop.stop();
                return Err(RuntimeError::Spawn { index, source });
            }
        }
    }
    Ok(Workers { handles })
}

/// A cloneable stop flag, set by a signal or by [`StopSignal::stop`].
///
/// Cheap to check: [`StopSignal::is_stopped`] is one relaxed atomic load.
/// Wake hooks registered with [`StopSignal::add_waker`] (a mio waker) or
/// [`StopSignal::add_wake_fn`] (anything else, e.g. an io_uring loop's
/// eventfd) are called by a programmatic `stop()` (not by signals: a signal
/// handler cannot safely take the lock), so loops blocked waiting for events
/// return at once in that case.
#[derive(Clone, Debug, Default)]
pub struct StopSignal {
    flag: Arc<AtomicBool>,
    wakers: Arc<Mutex<Vec<WakeFn>>>,
}

/// A wake hook: called with `true` it wakes its loop, with `false` it only
/// tells; either way it returns whether that loop still exists (`false`:
/// drop the hook).
struct WakeFn(Box<dyn Fn(bool) -> bool + Send + Sync>);

impl std::fmt::Debug for WakeFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WakeFn")
    }
}

impl StopSignal {
    /// A new, unset flag with no signal handlers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide flag, with SIGINT and SIGTERM handlers installed on
    /// first use. Every call returns a clone of the same flag.
    pub fn process() -> io::Result<StopSignal> {
        // Handlers are installed inside the once-initialiser, so racing
        // callers cannot register two flags; a failure is remembered.
        static PROCESS: OnceLock<Result<StopSignal, String>> = OnceLock::new();
        PROCESS
            .get_or_init(|| {
                let s = StopSignal::new();
                s.install_signal_handlers()
                    .map(|()| s)
                    .map_err(|e| format!("cannot install SIGINT/SIGTERM handlers: {e}"))
            })
            .clone()
            .map_err(io::Error::other)
    }

    /// Makes SIGINT and SIGTERM set this flag. A second SIGINT after the flag
    /// is set terminates the process with status 130.
    pub fn install_signal_handlers(&self) -> io::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        // Order matters: the conditional shutdown must be registered first so
        // that the first SIGINT only sets the flag.
        signal_hook::flag::register_conditional_shutdown(SIGINT, 130, Arc::clone(&self.flag))?;
        signal_hook::flag::register(SIGINT, Arc::clone(&self.flag))?;
        signal_hook::flag::register(SIGTERM, Arc::clone(&self.flag))?;
        Ok(())
    }

    /// True once a stop was requested. Check once per event-loop iteration.
    #[inline]
    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// Requests a stop and wakes every registered waker.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::Relaxed);
        let wakers = match self.wakers.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        for w in wakers.iter() {
            // A failed wake only delays the stop to the next poll timeout.
            let _ = (w.0)(true);
        }
    }

    /// Registers a worker's `mio::Waker` to be woken by [`StopSignal::stop`].
    pub fn add_waker(&self, waker: Arc<mio::Waker>) {
        self.add_wake_fn(move |wake| {
            if wake {
                let _ = waker.wake();
            }
            true
        });
    }

    /// Registers a wake hook: [`StopSignal::stop`] calls it with `true` (wake
    /// the loop). Called with `false` it only returns whether its loop still
    /// exists: hooks whose loop is gone are dropped when the next one is
    /// added, so a process that runs many loops on one signal does not keep
    /// them all.
    pub fn add_wake_fn(&self, wake: impl Fn(bool) -> bool + Send + Sync + 'static) {
        let mut w = match self.wakers.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        w.retain(|f| (f.0)(false));
        w.push(WakeFn(Box::new(wake)));
    }

    /// The underlying flag (e.g. for signal-hook or another library).
    pub fn flag(&self) -> &Arc<AtomicBool> {
        &self.flag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_get_distinct_indices_and_return_results_in_order() {
        let stop = StopSignal::new();
        let workers = spawn_workers(&Cpus::Count(3), "t", &stop, |ctx| {
            assert_eq!(ctx.count, 3);
            assert_eq!(
                std::thread::current().name(),
                Some(format!("t-{}", ctx.index).as_str())
            );
            ctx.index * 10
        })
        .unwrap();
        assert_eq!(workers.len(), 3);
        assert_eq!(workers.join().unwrap(), vec![0, 10, 20]);
    }

    /// The CPUs the calling thread may run on, as the kernel reports them.
    fn allowed_cpus_of_this_thread() -> Vec<usize> {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list in /proc/thread-self/status");
        affinity::parse_cpu_list(list.trim()).unwrap()
    }

    #[test]
    fn workers_are_pinned_to_listed_cpus() {
        let cores = affinity::available_cores();
        assert!(!cores.is_empty(), "the OS reports no CPUs");
        let stop = StopSignal::new();
        // One worker per CPU, each asked for its own; the kernel's view of
        // each worker thread must be exactly that one CPU.
        let out = spawn_workers(&Cpus::List(cores.clone()), "pin", &stop, |ctx| {
            (ctx.core, ctx.pinned, allowed_cpus_of_this_thread())
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(out.len(), cores.len());
        for (&cpu, (core, pinned, allowed)) in cores.iter().zip(out) {
            assert_eq!(core, Some(cpu));
            assert!(pinned, "pinning to CPU {cpu} failed");
            assert_eq!(allowed, vec![cpu], "worker asked for CPU {cpu}");
        }
        // The spawning thread itself is left alone.
        assert_eq!(allowed_cpus_of_this_thread(), cores);
    }

    #[test]
    fn counted_workers_are_pinned_round_robin() {
        let cores = affinity::available_cores();
        let n = cores.len() + 1;
        let stop = StopSignal::new();
        let out = spawn_workers(&Cpus::Count(n), "rr", &stop, |_| {
            allowed_cpus_of_this_thread()
        })
        .unwrap()
        .join()
        .unwrap();
        let want: Vec<Vec<usize>> = (0..n).map(|i| vec![cores[i % cores.len()]]).collect();
        assert_eq!(out, want);
    }

    #[test]
    fn zero_workers_and_unknown_cpus_are_errors() {
        assert!(matches!(
            Cpus::Count(0).plan(),
            Err(RuntimeError::NoWorkers)
        ));
        assert!(matches!(
            Cpus::List(vec![]).plan(),
            Err(RuntimeError::NoWorkers)
        ));
        if !affinity::available_cores().is_empty() {
            let err = Cpus::List(vec![affinity::MAX_CPU_ID]).plan().unwrap_err();
            assert!(err.to_string().contains("not available"), "{err}");
        }
    }

    #[test]
    fn the_process_signal_is_one_shared_flag() {
        let a = StopSignal::process().unwrap();
        let b = StopSignal::process().unwrap();
        assert!(Arc::ptr_eq(a.flag(), b.flag()));
    }

    #[test]
    fn sigterm_sets_the_flag() {
        let s = StopSignal::new();
        s.install_signal_handlers().unwrap();
        assert!(!s.is_stopped());
        signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
        assert!(s.is_stopped());
    }

    #[test]
    fn a_panicking_worker_is_reported_by_join() {
        let stop = StopSignal::new();
        let workers = spawn_workers(&Cpus::Count(2), "p", &stop, |ctx| {
            if ctx.index == 1 {
                panic!("boom");
            }
        })
        .unwrap();
        let err = workers.join().unwrap_err().to_string();
        assert!(err.contains("worker thread 1 panicked: boom"), "{err}");
    }

    #[test]
    fn stop_calls_live_wake_hooks_and_hooks_of_gone_loops_are_dropped() {
        use std::sync::atomic::AtomicUsize;
        let stop = StopSignal::new();
        let woken = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        {
            let (woken, alive) = (Arc::clone(&woken), Arc::clone(&alive));
            stop.add_wake_fn(move |wake| {
                if wake {
                    woken.fetch_add(1, Ordering::Relaxed);
                }
                alive.load(Ordering::Relaxed)
            });
        }
        let woken2 = Arc::clone(&woken);
        stop.add_wake_fn(move |wake| {
            if wake {
                woken2.fetch_add(10, Ordering::Relaxed);
            }
            true
        });
        assert_eq!(
            woken.load(Ordering::Relaxed),
            0,
            "adding a hook wakes nobody"
        );
        alive.store(false, Ordering::Relaxed);
        // The next add drops the first hook (its loop is gone).
        stop.add_wake_fn(|_| true);
        assert_eq!(stop.wakers.lock().unwrap().len(), 2);
        stop.stop();
        assert_eq!(woken.load(Ordering::Relaxed), 10);
        assert!(stop.is_stopped());
    }

    #[test]
    fn stop_wakes_a_worker_blocked_in_poll() {
        let stop = StopSignal::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let workers = spawn_workers(&Cpus::Count(1), "w", &stop, move |ctx| {
            let mut poll = mio::Poll::new().unwrap();
            let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
            ctx.stop.add_waker(waker);
            tx.send(()).unwrap();
            let mut events = mio::Events::with_capacity(8);
            let mut iterations = 0;
            while !ctx.stop.is_stopped() {
                poll.poll(&mut events, Some(Duration::from_secs(10)))
                    .unwrap();
                iterations += 1;
            }
            iterations
        })
        .unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let started = std::time::Instant::now();
        stop.stop();
        let iterations = workers.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(iterations[0] <= 2);
    }
}
