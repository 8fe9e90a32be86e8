//! The server's counters and latency histograms, rendered in Prometheus' text format.

use mamba_lm::scheduler::Busy;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency buckets.
const BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    n: u64,
}

impl Histogram {
    fn observe(&mut self, x: f64) {
        if let Some(b) = BUCKETS.iter().position(|&u| x <= u) {
            self.counts[b] += 1;
        }
        self.sum += x;
        self.n += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (u, c) in BUCKETS.iter().zip(self.counts) {
            acc += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{u}\"}} {acc}");
        }
        let _ =
            writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", self.n, self.sum, self.n);
    }
}

/// Shared between the HTTP handlers and the model's thread.
#[derive(Default)]
pub struct Metrics {
    pub requests: Mutex<Vec<(String, u16, u64)>>,
    pub prompt_tokens: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_bytes: AtomicUsize,
    /// Sequences accepted and not yet ended (the limit on concurrent work applies to it).
    pub in_flight: AtomicUsize,
    /// Sequences waiting for a slot, and in slots.
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    ttft: Mutex<Histogram>,
    per_token: Mutex<Histogram>,
    /// Seconds of the model thread's steps: in the backend ([`Busy`]) and the rest.
    engine: Mutex<(Busy, f64)>,
}

impl Metrics {
    /// Counts a finished request by endpoint and HTTP status.
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut r = self.requests.lock().unwrap();
        match r.iter_mut().find(|(e, s, _)| e == endpoint && *s == status) {
            Some(x) => x.2 += 1,
            None => r.push((endpoint.to_string(), status, 1)),
        }
    }

    pub fn time_to_first_token(&self, s: f64) {
        self.ttft.lock().unwrap().observe(s);
    }

    pub fn time_per_token(&self, s: f64) {
        self.per_token.lock().unwrap().observe(s);
    }

    /// Adds a scheduler step of `wall` seconds that moved its busy times from `from` to `to`.
    pub fn engine_step(&self, from: Busy, to: Busy, wall: f64) {
        let mut e = self.engine.lock().unwrap();
        let (p, d, s) = (to.prefill - from.prefill, to.decode - from.decode, to.states - from.states);
        e.0.prefill += p;
        e.0.decode += d;
        e.0.states += s;
        e.1 += (wall - p - d - s).max(0.0);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP mamba_requests_total Requests answered, by endpoint and status.");
        let _ = writeln!(out, "# TYPE mamba_requests_total counter");
        for (e, s, n) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(out, "mamba_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}");
        }
        let counters = [
            ("mamba_prompt_tokens_total", "Prompt tokens received.", self.prompt_tokens.load(Relaxed) as f64),
            (
                "mamba_cached_prompt_tokens_total",
                "Prompt tokens served from the prefix-state cache or a session instead of prefilled.",
                self.cached_prompt_tokens.load(Relaxed) as f64,
            ),
            ("mamba_generated_tokens_total", "Tokens generated.", self.generated_tokens.load(Relaxed) as f64),
            (
                "mamba_prefix_cache_hits_total",
                "Prompts that started from a cached state.",
                self.cache_hits.load(Relaxed) as f64,
            ),
            (
                "mamba_prefix_cache_misses_total",
                "Prompts prefilled from the start.",
                self.cache_misses.load(Relaxed) as f64,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let gauges = [
            ("mamba_queue_depth", "Sequences waiting for a slot.", self.queued.load(Relaxed)),
            ("mamba_batch_size", "Sequences in slots (prefilling or decoding).", self.running.load(Relaxed)),
            ("mamba_prefix_cache_bytes", "Bytes of states held by the prefix cache.", self.cache_bytes.load(Relaxed)),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let (busy, rest) = *self.engine.lock().unwrap();
        let name = "mamba_engine_seconds_total";
        let _ = writeln!(
            out,
            "# HELP {name} The model thread's time: prompt passes, decode steps, states copied in and out, \
             the rest of its steps (sampling, text, sending).\n# TYPE {name} counter"
        );
        let phases = [("prefill", busy.prefill), ("decode", busy.decode), ("states", busy.states), ("other", rest)];
        for (phase, v) in phases {
            let _ = writeln!(out, "{name}{{phase=\"{phase}\"}} {v}");
        }
        self.ttft.lock().unwrap().render(
            &mut out,
            "mamba_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
        );
        self.per_token.lock().unwrap().render(
            &mut out,
            "mamba_time_per_output_token_seconds",
            "Between a stream's tokens.",
        );
        out
    }
}
