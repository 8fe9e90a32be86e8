//! A fork-join pool for the many small parallel loops of a decode step. A token runs ~100
//! matrix-vector products of a few hundred microseconds each; waking sleeping threads for each
//! one (as a general-purpose pool does) costs tens of microseconds, a sizeable share of the
//! step. Here workers spin on an epoch counter between loops and only park after a
//! millisecond of idleness, so back-to-back loops start in well under a microsecond.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    epoch: AtomicUsize,
    job: UnsafeCell<Option<Job>>,
    n_tasks: AtomicUsize,
    next: AtomicUsize,
    pending: AtomicUsize,
    panicked: AtomicBool,
    sleeping: Vec<AtomicBool>,
}

// Safety: `job` is written only by the thread holding `Pool::caller` before the epoch is
// published with Release ordering, and read by workers after an Acquire load of it.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

struct Pool {
    shared: Arc<Shared>,
    threads: Vec<Thread>,
    caller: Mutex<()>,
}

const SPIN: Duration = Duration::from_millis(1);

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let workers = rayon::current_num_threads().saturating_sub(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            n_tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: (0..workers).map(|_| AtomicBool::new(false)).collect(),
        });
        let threads = (0..workers)
            .map(|w| {
                let s = shared.clone();
                thread::Builder::new()
                    .name(format!("mamba-lm-{w}"))
                    .spawn(move || worker(&s, w))
                    .expect("cannot spawn worker thread")
                    .thread()
                    .clone()
            })
            .collect();
        Pool { shared, threads, caller: Mutex::new(()) }
    })
}

fn run_tasks(s: &Shared, f: Job) {
    let n = s.n_tasks.load(Ordering::Acquire);
    loop {
        let i = s.next.fetch_add(1, Ordering::AcqRel);
        if i >= n {
            break;
        }
        // Safety: the caller keeps `f` alive until `pending` reaches zero.
        unsafe { (*f)(i) };
    }
}

fn worker(s: &Shared, w: usize) {
    let mut seen = 0;
    loop {
        let t0 = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins += 1;
            if spins.is_multiple_of(1024) && t0.elapsed() > SPIN {
                s.sleeping[w].store(true, Ordering::SeqCst);
                if s.epoch.load(Ordering::SeqCst) == seen {
                    thread::park();
                }
                s.sleeping[w].store(false, Ordering::SeqCst);
            } else {
                std::hint::spin_loop();
            }
        }
        // Safety: published before the epoch bump we just observed.
        let f = unsafe { (*s.job.get()).expect("job published") };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_tasks(s, f))).is_err() {
            s.panicked.store(true, Ordering::SeqCst);
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `f(0) … f(n_tasks − 1)` across the pool's threads and the caller, returning when all
/// are done. Nested or concurrent calls run serially on the calling thread.
pub fn parallel_for(n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let p = pool();
    let guard = if n_tasks > 1 && !p.threads.is_empty() { p.caller.try_lock().ok() } else { None };
    let Some(_guard) = guard else {
        (0..n_tasks).for_each(f);
        return;
    };
    let s = &*p.shared;
    // Safety: the lifetime is erased for the duration of this call only: we return after every
    // worker has finished with it. Only the lock holder writes `job`, while workers are idle.
    let job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
    unsafe { *s.job.get() = Some(job) };
    s.n_tasks.store(n_tasks, Ordering::Release);
    s.next.store(0, Ordering::Release);
    s.pending.store(p.threads.len(), Ordering::Release);
    s.epoch.fetch_add(1, Ordering::SeqCst);
    for (w, t) in p.threads.iter().enumerate() {
        if s.sleeping[w].load(Ordering::SeqCst) {
            t.unpark();
        }
    }
    // Workers may still be running `f` when a task panics here: wait for them before unwinding.
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_tasks(s, job)));
    while s.pending.load(Ordering::Acquire) != 0 {
        std::hint::spin_loop();
    }
    if let Err(p) = mine {
        std::panic::resume_unwind(p);
    }
    if s.panicked.swap(false, Ordering::SeqCst) {
        panic!("a worker thread panicked");
    }
}
