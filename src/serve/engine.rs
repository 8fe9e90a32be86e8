//! The model's thread: it owns the backend and a [`Scheduler`], takes requests from the HTTP
//! handlers over a channel and streams each sequence's events back over the request's own
//! channel. A request whose channel is gone (the client disconnected) is cancelled at the
//! next step. Prompts start from the longest cached prefix state or from a named session.

use super::cache::{PrefixCache, MIN_PREFIX};
use super::metrics::Metrics;
use mamba_lm::backend::Backend;
use mamba_lm::scheduler::{Control, Event, Finish, Job, Logprob, Params, Scheduler};
use mamba_lm::tokenizer::Tokenizer;
use mamba_lm::Snapshot;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// One sequence to generate.
pub struct Request {
    /// Which of the HTTP request's sequences this is (prompt × choice).
    pub index: usize,
    pub prompt: Vec<u32>,
    pub params: Params,
    /// Continue from the state kept under this name (when there is one) and keep the final
    /// state under it.
    pub session: Option<String>,
    pub arrived: Instant,
    pub out: UnboundedSender<(usize, Msg)>,
}

/// What the handler of a request hears.
pub enum Msg {
    /// Admitted: this many prompt tokens came from the cache or the session.
    Started {
        cached: usize,
    },
    Token {
        id: u32,
        text: String,
        logprob: Option<Logprob>,
    },
    Text(String),
    Done {
        finish: Finish,
        prompt_tokens: usize,
        new_tokens: usize,
    },
    /// Refused (a bad request) or the model failed (the message says which).
    Failed {
        status: u16,
        message: String,
    },
}

pub struct Options {
    pub max_batch: usize,
    /// Prompt tokens fed per step while others decode.
    pub prefill_budget: usize,
    pub cache_bytes: usize,
    pub max_sessions: usize,
}

struct Live {
    index: usize,
    out: UnboundedSender<(usize, Msg)>,
    session: Option<String>,
    arrived: Instant,
    last: Option<Instant>,
    prompt_tokens: usize,
}

/// Runs until the channel of requests closes and every sequence has ended.
pub fn run(
    be: &mut dyn Backend,
    tok: &Tokenizer,
    rx: Receiver<Request>,
    m: Arc<Metrics>,
    o: Options,
) -> anyhow::Result<()> {
    let mut sched = Scheduler::new(be, o.max_batch, Some(tok))?;
    sched.prefill_budget = o.prefill_budget;
    let mut cache = PrefixCache::new(o.cache_bytes);
    let mut sessions: Vec<(String, Snapshot)> = Vec::new();
    let mut live: HashMap<u64, Live> = HashMap::new();
    let mut open = true;
    loop {
        // Wait for work when idle; otherwise take what has arrived without waiting.
        let mut incoming = Vec::new();
        if sched.is_empty() {
            if !open {
                return Ok(());
            }
            match rx.recv() {
                Ok(r) => incoming.push(r),
                Err(_) => return Ok(()),
            }
        }
        loop {
            match rx.try_recv() {
                Ok(r) => incoming.push(r),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let (busy, t0) = (sched.busy, Instant::now());
        for r in incoming {
            admit(&mut sched, &mut cache, &mut sessions, &mut live, &m, r);
        }
        let mut gone = Vec::new();
        let mut finished = Vec::new();
        let stepped = sched.step(&mut |id, ev| {
            let Some(l) = live.get_mut(&id) else { return Control::Continue };
            let msg = match ev {
                Event::Mark(_, snap) => {
                    cache.insert(snap);
                    return Control::Continue;
                }
                Event::Token { id: t, text, logprob } => {
                    let now = Instant::now();
                    match l.last {
                        None => m.time_to_first_token((now - l.arrived).as_secs_f64()),
                        Some(t0) => m.time_per_token((now - t0).as_secs_f64()),
                    }
                    l.last = Some(now);
                    m.generated_tokens.fetch_add(1, Relaxed);
                    Msg::Token { id: t, text: text.to_string(), logprob }
                }
                Event::Text(text) => Msg::Text(text.to_string()),
                Event::Done(out) => {
                    finished.push(id);
                    if let (Some(name), Some(snap), true) = (&l.session, out.snapshot, out.finish != Finish::Cancelled)
                    {
                        keep_session(&mut sessions, name.clone(), snap, o.max_sessions);
                    }
                    let new_tokens = out.new_ids.len();
                    Msg::Done { finish: out.finish, prompt_tokens: l.prompt_tokens, new_tokens }
                }
            };
            if l.out.send((l.index, msg)).is_err() {
                gone.push(id);
                return Control::Stop;
            }
            Control::Continue
        });
        m.engine_step(busy, sched.busy, t0.elapsed().as_secs_f64());
        if let Err(e) = stepped {
            // The model failed: every sequence in flight hears it; the server stays up for
            // the next requests on a fresh scheduler.
            for (_, l) in live.drain() {
                m.in_flight.fetch_sub(1, Relaxed);
                let _ =
                    l.out.send((l.index, Msg::Failed { status: 500, message: format!("generation failed: {e:#}") }));
            }
            drop(sched);
            sched = Scheduler::new(be, o.max_batch, Some(tok))?;
            sched.prefill_budget = o.prefill_budget;
        }
        gone.iter().for_each(|&id| sched.cancel(id));
        for id in finished {
            live.remove(&id);
            m.in_flight.fetch_sub(1, Relaxed);
        }
        m.running.store(sched.running(), Relaxed);
        m.queued.store(sched.queued(), Relaxed);
        m.cache_bytes.store(cache.bytes(), Relaxed);
    }
}

fn keep_session(sessions: &mut Vec<(String, Snapshot)>, name: String, snap: Snapshot, max: usize) {
    sessions.retain(|(n, _)| *n != name);
    sessions.push((name, snap));
    if sessions.len() > max {
        sessions.remove(0);
    }
}

fn admit(
    sched: &mut Scheduler,
    cache: &mut PrefixCache,
    sessions: &mut [(String, Snapshot)],
    live: &mut HashMap<u64, Live>,
    m: &Metrics,
    r: Request,
) {
    let total = r.prompt.len();
    // `cached`: prompt tokens served by the prefix cache (None: continuing a session).
    let (resume, prompt, marks, cached) = match r.session.as_ref().and_then(|n| sessions.iter().find(|(s, _)| s == n)) {
        Some((_, snap)) => (Some(snap.clone()), r.prompt, vec![], None),
        None => {
            let hit = cache.lookup(&r.prompt);
            let h = hit.as_ref().map_or(0, |s| s.tokens.len());
            // Keep the state where this prompt leaves the cached one it shares most with, and
            // at its end.
            let fork = cache.shared(&r.prompt);
            // (Each mark costs a copy of the state: none without a cache.)
            let mut marks = Vec::new();
            if cache.enabled() {
                if fork > h && fork >= MIN_PREFIX && fork < total {
                    marks.push(fork - h);
                }
                if total >= MIN_PREFIX && total > h {
                    marks.push(total - h);
                }
            }
            (hit, r.prompt[h..].to_vec(), marks, Some(h))
        }
    };
    if let Some(h) = cached {
        let c = if h > 0 { &m.cache_hits } else { &m.cache_misses };
        c.fetch_add(1, Relaxed);
    }
    let cached = cached.unwrap_or(0);
    m.prompt_tokens.fetch_add(total as u64, Relaxed);
    m.cached_prompt_tokens.fetch_add(cached as u64, Relaxed);
    // The final state is kept for a session only.
    let keep_state = r.session.is_some();
    match sched.submit(Job { prompt, resume, params: r.params, marks, keep_state }) {
        Ok(id) => {
            if r.out.send((r.index, Msg::Started { cached })).is_err() {
                sched.cancel(id);
            }
            let l = Live {
                index: r.index,
                out: r.out,
                session: r.session,
                arrived: r.arrived,
                last: None,
                prompt_tokens: total,
            };
            live.insert(id, l);
        }
        Err(e) => {
            m.in_flight.fetch_sub(1, Relaxed);
            let _ = r.out.send((r.index, Msg::Failed { status: 400, message: e.to_string() }));
        }
    }
}
