//! `mamba-lm serve`: an OpenAI-compatible HTTP server (axum on tokio). The handlers parse and
//! check requests, tokenize, and hand sequences to the model's thread ([`engine`]), which
//! batches them continuously; tokens come back over a channel per request, as server-sent
//! events or one JSON answer.

mod api;
mod cache;
mod chat;
mod engine;
mod metrics;

use crate::{eos_id, load_model, ModelArgs};
use anyhow::{anyhow, Context, Result};
use api::{common, finish_reason, ApiError, Body, Limits};
use axum::body::Bytes;
use axum::extract::{rejection::BytesRejection, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use engine::{Msg, Request};
use mamba_lm::scheduler::{Finish, Logprob, Params};
use mamba_lm::tokenizer::{self, Tokenizer};
use metrics::Metrics;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    m: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded together (slots; each holds one state).
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Sequences waiting for a slot beyond which requests get 429.
    #[arg(long, default_value_t = 1024)]
    max_queue: usize,
    /// Prompt tokens fed per step while other streams decode (bounds their per-token latency).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// Memory for cached prefix states, in MB (0: no cache, and no state copied out to fill it);
    /// on the GPU, device memory.
    #[arg(long, default_value_t = 1024)]
    cache_mb: usize,
    /// Sessions kept (least recently finished dropped first).
    #[arg(long, default_value_t = 256)]
    max_sessions: usize,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 4096)]
    max_tokens_limit: usize,
    /// Largest prompt, in tokens.
    #[arg(long, default_value_t = 32768)]
    max_prompt_tokens: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Required as `Authorization: Bearer KEY` on /v1 (repeat for several keys).
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// Jinja chat template instead of the model's own (or the plain one).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Name the model answers to in /v1/models (default: the --model value).
    #[arg(long)]
    served_name: Option<String>,
    /// Seconds that running streams get to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
}

struct App {
    tok: Arc<Tokenizer>,
    chat: chat::ChatTemplate,
    name: String,
    eos: Option<u32>,
    vocab_limit: usize,
    limits: Limits,
    max_prompt: usize,
    max_waiting: usize,
    keys: Vec<String>,
    to_engine: std::sync::Mutex<mpsc::Sender<Request>>,
    metrics: Arc<Metrics>,
}

pub fn cmd_serve(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 || a.prefill_chunk == 0 {
        return Err(anyhow!("--max-batch and --prefill-chunk must be at least 1"));
    }
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = mpsc::channel::<Request>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(Arc<Tokenizer>, PathBuf, Option<u32>, usize)>>();
    let name = a.served_name.clone().unwrap_or_else(|| a.m.model.clone());
    // The model lives on its own thread from loading to the end (the GPU's context with it).
    let m = a.m;
    let engine_metrics = metrics.clone();
    let opts = engine::Options {
        max_batch: a.max_batch,
        prefill_budget: a.prefill_chunk,
        cache_bytes: a.cache_mb << 20,
        max_sessions: a.max_sessions,
    };
    let tok_path = m.tokenizer.clone();
    let engine = std::thread::spawn(move || -> Result<()> {
        let loaded = load_model(&m).and_then(|(model, dir)| {
            let tok = Arc::new(tokenizer::load(tok_path.as_deref(), Some(&dir))?);
            Ok((model, dir, tok))
        });
        let (model, dir, tok) = match loaded {
            Ok(x) => x,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return Ok(());
            }
        };
        let eos = eos_id(model.cfg(), &dir, &tok);
        let limit = model.cfg().vocab_size.min(tok.get_vocab_size(true));
        let _ = ready_tx.send(Ok((tok.clone(), dir, eos, limit)));
        let mut be = model.backend(false);
        engine::run(be.as_mut(), &tok, rx, engine_metrics, opts)
    });
    let (tok, dir, eos, vocab_limit) = ready_rx.recv().map_err(|_| anyhow!("the model's thread ended early"))??;
    let app = Arc::new(App {
        tok,
        chat: chat::ChatTemplate::load(a.chat_template.as_deref(), &dir)?,
        name,
        eos,
        vocab_limit,
        limits: Limits { max_tokens: a.max_tokens_limit, default_max_tokens: 16, max_n: 16 },
        max_prompt: a.max_prompt_tokens,
        max_waiting: a.max_batch + a.max_queue,
        keys: a.api_keys.clone(),
        to_engine: std::sync::Mutex::new(tx),
        metrics,
    });
    let router = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(|State(app): State<Arc<App>>| async move { app.metrics.render() }))
        .route("/v1/models", get(models))
        .route(
            "/openapi.json",
            get(|| async { ([("content-type", "application/json")], include_str!("openapi.json")) }),
        )
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async { ApiError::status(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(a.max_body_bytes))
        .with_state(app.clone());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener =
            tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!("mamba-lm serving {} on http://{}", app.name, listener.local_addr()?);
        let grace = a.shutdown_grace;
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("shutting down: new connections refused; streams get {grace} s to finish");
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_secs(grace)).await;
                    eprintln!("shutdown grace over: ending the remaining streams");
                    std::process::exit(0);
                });
            })
            .await
            .context("server failed")
    })?;
    engine.join().map_err(|_| anyhow!("the model's thread panicked"))?
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl App {
    fn authorize(&self, h: &HeaderMap) -> Result<(), ApiError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let given = h.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(k) if self.keys.iter().any(|x| x == k) => Ok(()),
            _ => {
                Err(ApiError::status(StatusCode::UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer KEY)"))
            }
        }
    }

    fn check_model(&self, b: &mut Body) -> Result<(), ApiError> {
        match b.take::<String>("model")? {
            Some(m) if m != self.name && m != "default" => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!("model `{m}` is not served here (this server serves `{}`)", self.name),
                param: Some("model".into()),
            }),
            _ => Ok(()),
        }
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        tokenizer::encode(&self.tok, text)
            .map_err(|e| ApiError::bad("prompt", format!("cannot tokenize the prompt: {e}")))
    }

    fn token_text(&self, id: u32) -> String {
        tokenizer::decode(&self.tok, &[id]).unwrap_or_default()
    }

    /// Queues `prompts` × `n` sequences; their messages arrive tagged with prompt × n + choice.
    fn submit(
        &self,
        prompts: &[Vec<u32>],
        c: &api::Common,
        logprobs: Option<usize>,
        stops: Vec<String>,
    ) -> Result<UnboundedReceiver<(usize, Msg)>, ApiError> {
        for p in prompts {
            if p.len() > self.max_prompt {
                return Err(ApiError::bad(
                    "prompt",
                    format!("the prompt has {} tokens; this server takes at most {}", p.len(), self.max_prompt),
                ));
            }
            if p.is_empty() && c.session.is_none() {
                return Err(ApiError::bad("prompt", "the prompt is empty"));
            }
        }
        if c.session.is_some() && prompts.len() * c.n != 1 {
            return Err(ApiError::bad("session", "a session continues one sequence: give one prompt and n = 1"));
        }
        let k = prompts.len() * c.n;
        let before = self.metrics.in_flight.fetch_add(k, Relaxed);
        if before + k > self.max_waiting {
            self.metrics.in_flight.fetch_sub(k, Relaxed);
            return Err(ApiError::status(StatusCode::TOO_MANY_REQUESTS, "the server is at capacity; retry shortly"));
        }
        let (out, rx) = unbounded_channel();
        let seed = c.seed.unwrap_or_else(rand::random);
        let tx = self.to_engine.lock().unwrap().clone();
        for (pi, p) in prompts.iter().enumerate() {
            for j in 0..c.n {
                let params = Params {
                    max_new_tokens: c.max_tokens,
                    sampling: c.sampling.clone(),
                    seed: seed.wrapping_add(j as u64),
                    eos: if c.ignore_eos { None } else { self.eos },
                    vocab_limit: self.vocab_limit,
                    stops: stops.clone(),
                    logprobs,
                };
                let r = Request {
                    index: pi * c.n + j,
                    prompt: p.clone(),
                    params,
                    session: c.session.clone(),
                    arrived: Instant::now(),
                    out: out.clone(),
                };
                if tx.send(r).is_err() {
                    return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the model has stopped"));
                }
            }
        }
        Ok(rx)
    }
}

async fn models(State(app): State<Arc<App>>, h: HeaderMap) -> Response {
    if let Err(e) = app.authorize(&h) {
        return e.into_response();
    }
    Json(json!({"object": "list", "data": [{"id": app.name, "object": "model", "created": 0, "owned_by": "mamba-lm"}]}))
        .into_response()
}

/// What a completion or chat request asks for, once checked.
struct Ask {
    chat: bool,
    prompts: Vec<Vec<u32>>,
    c: api::Common,
    logprobs: Option<usize>,
    /// Completions' `echo`: the prompt's text leads the choice's text.
    echo: Vec<String>,
    stops: Vec<String>,
}

async fn completions(State(app): State<Arc<App>>, h: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        app.authorize(&h)?;
        let mut b = Body::parse(&body.map_err(|e| ApiError::status(e.status(), e.body_text()))?)?;
        app.check_model(&mut b)?;
        let prompts: Vec<Vec<u32>> = match b.take::<Value>("prompt")? {
            None => return Err(ApiError::bad("prompt", "`prompt` is required")),
            Some(Value::String(s)) => vec![app.encode(&s)?],
            Some(v) => match serde_json::from_value::<Vec<String>>(v.clone()) {
                Ok(list) => list.iter().map(|s| app.encode(s)).collect::<Result<_, _>>()?,
                Err(_) => match serde_json::from_value::<Vec<u32>>(v.clone()) {
                    Ok(ids) => vec![ids],
                    Err(_) => serde_json::from_value::<Vec<Vec<u32>>>(v).map_err(|_| {
                        ApiError::bad(
                            "prompt",
                            "`prompt` must be a string, a list of strings, a list of token ids or a list of such lists",
                        )
                    })?,
                },
            },
        };
        if prompts.is_empty() {
            return Err(ApiError::bad("prompt", "`prompt` is an empty list"));
        }
        let c = common(&mut b, &app.limits, "max_tokens")?;
        let logprobs = b.take::<usize>("logprobs")?;
        if logprobs.is_some_and(|n| n > 5) {
            return Err(ApiError::bad("logprobs", "`logprobs` must be in [0, 5]"));
        }
        let echo = if b.take::<bool>("echo")?.unwrap_or(false) {
            prompts.iter().map(|p| tokenizer::decode(&app.tok, p).unwrap_or_default()).collect()
        } else {
            vec![]
        };
        b.finish()?;
        let stops = c.stop.clone();
        Ok(Ask { chat: false, prompts, c, logprobs, echo, stops })
    }
    .await;
    respond(app, "completions", r).await
}

async fn chat_completions(State(app): State<Arc<App>>, h: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        app.authorize(&h)?;
        let mut b = Body::parse(&body.map_err(|e| ApiError::status(e.status(), e.body_text()))?)?;
        app.check_model(&mut b)?;
        let msgs: Vec<Value> =
            b.take("messages")?.ok_or_else(|| ApiError::bad("messages", "`messages` is required"))?;
        if msgs.is_empty() {
            return Err(ApiError::bad("messages", "`messages` is empty"));
        }
        let mut turns = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            let bad = || ApiError::bad("messages", format!("messages[{i}] needs a string `role` and text `content`"));
            let role = m.get("role").and_then(Value::as_str).ok_or_else(bad)?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                // Parts: the text ones, joined.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => Err(bad()),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                _ => return Err(bad()),
            };
            turns.push((role.to_string(), content));
        }
        let c = common(&mut b, &app.limits, "max_tokens")?;
        let logprobs = match (b.take::<bool>("logprobs")?.unwrap_or(false), b.take::<usize>("top_logprobs")?) {
            (_, Some(n)) if n > 20 => return Err(ApiError::bad("top_logprobs", "`top_logprobs` must be in [0, 20]")),
            (false, Some(_)) => return Err(ApiError::bad("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
            (true, n) => Some(n.unwrap_or(0)),
            (false, None) => None,
        };
        b.finish()?;
        let text = app.chat.render(&turns).map_err(|e| ApiError::bad("messages", e))?;
        let prompts = vec![app.encode(&text)?];
        let mut stops = c.stop.clone();
        stops.extend(app.chat.stops());
        Ok(Ask { chat: true, prompts, c, logprobs, echo: vec![], stops })
    }
    .await;
    respond(app, "chat/completions", r).await
}

/// One choice as it builds up.
#[derive(Default)]
struct Choice {
    text: String,
    logprobs: Vec<(u32, Logprob)>,
    finish: Option<Finish>,
    prompt_tokens: usize,
    new_tokens: usize,
    cached: usize,
}

impl App {
    fn logprobs_json(&self, chat: bool, lps: &[(u32, Logprob)], offset: usize) -> Value {
        if chat {
            let entry = |id: u32, lp: f32| {
                let t = self.token_text(id);
                json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
            };
            let content: Vec<Value> = lps
                .iter()
                .map(|(id, l)| {
                    let mut e = entry(*id, l.logprob);
                    e["top_logprobs"] = l.top.iter().map(|&(t, p)| entry(t, p)).collect();
                    e
                })
                .collect();
            return json!({ "content": content });
        }
        let mut at = offset;
        let mut offsets = Vec::with_capacity(lps.len());
        let tokens: Vec<String> = lps
            .iter()
            .map(|(id, _)| {
                let t = self.token_text(*id);
                offsets.push(at);
                at += t.len();
                t
            })
            .collect();
        let top: Vec<Value> = lps
            .iter()
            .map(|(_, l)| Value::Object(l.top.iter().map(|&(t, p)| (self.token_text(t), json!(p))).collect()))
            .collect();
        json!({"tokens": tokens, "token_logprobs": lps.iter().map(|(_, l)| l.logprob).collect::<Vec<_>>(),
               "top_logprobs": top, "text_offset": offsets})
    }
}

impl Choice {
    /// The choice has ended. The choices of one prompt share it: only the first counts its
    /// tokens (and those the cache served) in the usage.
    fn end(&mut self, first_of_prompt: bool, finish: Finish, prompt_tokens: usize, new_tokens: usize) {
        self.finish = Some(finish);
        self.new_tokens = new_tokens;
        self.prompt_tokens = if first_of_prompt { prompt_tokens } else { 0 };
        if !first_of_prompt {
            self.cached = 0;
        }
    }
}

fn usage(choices: &[Choice]) -> Value {
    let prompt: usize = choices.iter().map(|c| c.prompt_tokens).sum();
    let cached: usize = choices.iter().map(|c| c.cached).sum();
    let completion: usize = choices.iter().map(|c| c.new_tokens).sum();
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

async fn respond(app: Arc<App>, endpoint: &'static str, ask: Result<Ask, ApiError>) -> Response {
    let r = match ask.and_then(|a| app.submit(&a.prompts, &a.c, a.logprobs, a.stops.clone()).map(|rx| (a, rx))) {
        Ok((a, rx)) if a.c.stream => Ok(stream(app.clone(), a, rx)),
        Ok((a, rx)) => whole(&app, a, rx).await,
        Err(e) => Err(e),
    };
    let r = r.unwrap_or_else(|e| e.into_response());
    app.metrics.request(endpoint, r.status().as_u16());
    r
}

fn ids(chat: bool) -> (String, &'static str) {
    let id = format!("{}-{:016x}", if chat { "chatcmpl" } else { "cmpl" }, rand::random::<u64>());
    (id, if chat { "chat.completion" } else { "text_completion" })
}

/// The whole answer at once.
async fn whole(app: &App, a: Ask, mut rx: UnboundedReceiver<(usize, Msg)>) -> Result<Response, ApiError> {
    let k = a.prompts.len() * a.c.n;
    let mut ch: Vec<Choice> = (0..k).map(|_| Choice::default()).collect();
    let mut left = k;
    while left > 0 {
        let Some((i, msg)) = rx.recv().await else {
            return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "the model's thread stopped"));
        };
        let c = &mut ch[i];
        match msg {
            Msg::Started { cached } => c.cached = cached,
            Msg::Token { id, text, logprob } => {
                c.text.push_str(&text);
                if let Some(l) = logprob {
                    c.logprobs.push((id, l));
                }
            }
            Msg::Text(t) => c.text.push_str(&t),
            Msg::Done { finish, prompt_tokens, new_tokens } => {
                c.end(i % a.c.n == 0, finish, prompt_tokens, new_tokens);
                left -= 1;
            }
            Msg::Failed { status, message } => return Err(ApiError::engine(status, message)),
        }
    }
    let (id, object) = ids(a.chat);
    let choices: Vec<Value> = ch
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let lead = a.echo.get(i / a.c.n).map_or("", String::as_str);
            let lp = a.logprobs.map(|_| app.logprobs_json(a.chat, &c.logprobs, lead.len()));
            let reason = finish_reason(c.finish.unwrap());
            if a.chat {
                json!({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": lp, "finish_reason": reason})
            } else {
                json!({"index": i, "text": format!("{lead}{}", c.text), "logprobs": lp, "finish_reason": reason})
            }
        })
        .collect();
    let mut body = json!({"id": id, "object": object, "created": now_s(), "model": app.name, "choices": choices, "usage": usage(&ch)});
    if let Some(s) = &a.c.session {
        body["session"] = json!(s);
    }
    Ok(Json(body).into_response())
}

/// Server-sent events: a chunk per piece of text, one with each choice's finish reason, the
/// usage if asked for, then `[DONE]`.
fn stream(app: Arc<App>, a: Ask, mut rx: UnboundedReceiver<(usize, Msg)>) -> Response {
    let (tx, events) = unbounded_channel::<Result<SseEvent, std::convert::Infallible>>();
    tokio::spawn(async move {
        let k = a.prompts.len() * a.c.n;
        let (id, object) = ids(a.chat);
        let object = if a.chat { "chat.completion.chunk" } else { object };
        let created = now_s();
        let mut ch: Vec<Choice> = (0..k).map(|_| Choice::default()).collect();
        let chunk = |i: usize, text: &str, lps: &[(u32, Logprob)], offset: usize, reason: Option<&str>| {
            let lp = a.logprobs.map(|_| app.logprobs_json(a.chat, lps, offset));
            let choice = if a.chat {
                let delta = if reason.is_some() && text.is_empty() { json!({}) } else { json!({"content": text}) };
                json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason})
            } else {
                json!({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
            };
            let mut v = json!({"id": id, "object": object, "created": created, "model": app.name, "choices": [choice]});
            if let (Some(s), Some(_)) = (&a.c.session, reason) {
                v["session"] = json!(s);
            }
            SseEvent::default().data(v.to_string())
        };
        let mut left = k;
        while left > 0 {
            let Some((i, msg)) = rx.recv().await else { break };
            let ev = match msg {
                Msg::Started { cached } => {
                    ch[i].cached = cached;
                    if a.chat {
                        let c = json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                        Some(SseEvent::default().data(json!({"id": id, "object": object, "created": created, "model": app.name, "choices": [c]}).to_string()))
                    } else {
                        // The echoed prompt leads the text: logprobs' offsets count it.
                        a.echo.get(i / a.c.n).map(|e| {
                            ch[i].text.push_str(e);
                            chunk(i, e, &[], 0, None)
                        })
                    }
                }
                Msg::Token { id: t, text, logprob } => {
                    let lps: Vec<(u32, Logprob)> = logprob.into_iter().map(|l| (t, l)).collect();
                    let offset = ch[i].text.len();
                    ch[i].text.push_str(&text);
                    (!text.is_empty() || !lps.is_empty()).then(|| chunk(i, &text, &lps, offset, None))
                }
                Msg::Text(t) => {
                    let offset = ch[i].text.len();
                    ch[i].text.push_str(&t);
                    Some(chunk(i, &t, &[], offset, None))
                }
                Msg::Done { finish, prompt_tokens, new_tokens } => {
                    left -= 1;
                    ch[i].end(i % a.c.n == 0, finish, prompt_tokens, new_tokens);
                    Some(chunk(i, "", &[], ch[i].text.len(), Some(finish_reason(finish))))
                }
                Msg::Failed { status, message } => {
                    let _ = tx.send(Ok(SseEvent::default().data(ApiError::engine(status, message).body().to_string())));
                    break;
                }
            };
            // The client has gone: dropping `rx` cancels the sequences.
            if let Some(ev) = ev {
                if tx.send(Ok(ev)).is_err() {
                    return;
                }
            }
        }
        if left == 0 && a.c.include_usage {
            let v = json!({"id": id, "object": object, "created": created, "model": app.name, "choices": [], "usage": usage(&ch)});
            let _ = tx.send(Ok(SseEvent::default().data(v.to_string())));
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
    });
    Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(events))
        .keep_alive(KeepAlive::default())
        .into_response()
}
