//! `mamba-lm serve` end to end on the bundled model: the OpenAI endpoints, streaming and not,
//! concurrent streams against the same requests run alone, the prefix cache and sessions
//! against a plain prefill, and the errors.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mamba-lm"))
        .args(["serve", "--port", "0", "--threads", "2"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("http://") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "the server ended before listening");
    }
    let addr = line.trim().rsplit("http://").next().unwrap().to_string();
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    Server { child, addr }
}

/// One HTTP/1.1 exchange: status and body.
fn http(addr: &str, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    headers.iter().for_each(|h| req.push_str(&format!("{h}\r\n")));
    req.push_str("Content-Type: application/json\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text[9..12].parse().unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { unchunk(rest) } else { rest.to_string() };
    (status, body)
}

fn unchunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn post(addr: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = http(addr, "POST", path, &[], body.to_string().as_bytes());
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A streamed completion's text, from its server-sent events.
fn streamed(addr: &str, body: Value) -> String {
    let (status, text) = http(addr, "POST", "/v1/completions", &[], body.to_string().as_bytes());
    assert_eq!(status, 200, "{text}");
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect()
}

fn text(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

#[test]
fn streams_together_equal_each_alone() {
    let s = serve(&["--max-batch", "8"]);
    let prompts: Vec<String> = (0..24).map(|i| format!("{} {}:", ["ROMEO", "JULIET", "HAMLET"][i % 3], i)).collect();
    let ask = |p: &str, stream: bool| json!({"prompt": p, "max_tokens": 12, "temperature": 0, "stream": stream});
    let alone: Vec<String> = prompts.iter().map(|p| text(&post(&s.addr, "/v1/completions", ask(p, false)).1)).collect();
    assert!(alone.iter().all(|t| !t.is_empty()));
    let together: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = prompts.iter().map(|p| sc.spawn(|| streamed(&s.addr, ask(p, true)))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
    let (_, m) = http(&s.addr, "GET", "/metrics", &[], b"");
    assert!(m.contains("mamba_requests_total{endpoint=\"completions\",status=\"200\"} 48"), "{m}");
    // 48 requests went through prompt passes and decode steps: both took time.
    for phase in ["prefill", "decode"] {
        let at = format!("mamba_engine_seconds_total{{phase=\"{phase}\"}} ");
        let line = m.lines().find_map(|l| l.strip_prefix(at.as_str())).unwrap_or_else(|| panic!("no {at}in {m}"));
        assert!(line.parse::<f64>().unwrap() > 0.0, "{m}");
    }
}

#[test]
fn cached_prefixes_and_sessions_give_the_plain_result() {
    let s = serve(&[]);
    let head =
        "KING HENRY: Once more unto the breach, dear friends, once more; or close the wall up with our English dead. ";
    let ask = |q: &str| json!({"prompt": format!("{head}{q}"), "max_tokens": 10, "temperature": 0});
    let (_, a) = post(&s.addr, "/v1/completions", ask("EXETER:"));
    let (_, b) = post(&s.addr, "/v1/completions", ask("GLOUCESTER:"));
    assert_eq!(b["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{b}");
    // B left A's prompt after the shared head: that point is cached now.
    let (_, c) = post(&s.addr, "/v1/completions", ask("BEDFORD:"));
    let cached = c["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= 20, "{c}");
    // The same request on a server with nothing cached.
    let fresh = serve(&[]);
    let (_, plain) = post(&fresh.addr, "/v1/completions", ask("BEDFORD:"));
    assert_eq!(text(&c), text(&plain));
    assert_ne!(text(&a), "");
    // A session holds the state after its prompt; continuing it equals the whole prompt at once.
    let ids = |p: std::ops::Range<u32>| p.map(|i| i * 7 % 4000 + 10).collect::<Vec<u32>>();
    let first = json!({"prompt": ids(0..30), "max_tokens": 0, "session": "s1"});
    let (st, v) = post(&s.addr, "/v1/completions", first);
    assert_eq!((st, v["session"].as_str()), (200, Some("s1")), "{v}");
    let (_, more) = post(
        &s.addr,
        "/v1/completions",
        json!({"prompt": ids(30..40), "max_tokens": 10, "temperature": 0, "session": "s1"}),
    );
    let (_, whole) =
        post(&fresh.addr, "/v1/completions", json!({"prompt": ids(0..40), "max_tokens": 10, "temperature": 0}));
    assert_eq!(text(&more), text(&whole));
}

#[test]
fn bad_requests_get_openai_errors() {
    let s = serve(&["--api-key", "k1", "--max-body-bytes", "10000"]);
    let auth = ["Authorization: Bearer k1"];
    let call = |body: &[u8], h: &[&str]| {
        let (st, t) = http(&s.addr, "POST", "/v1/completions", h, body);
        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
        (st, v["error"]["message"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(call(br#"{"prompt": "a"}"#, &[]).0, 401);
    assert_eq!(call(br#"{"prompt": "a"}"#, &["Authorization: Bearer nope"]).0, 401);
    for (body, status, says) in [
        (&br#"{"prompt": "a""#[..], 400, "not valid JSON"),
        (br#"[1, 2]"#, 400, "JSON object"),
        (br#"{"prompt": "a", "temprature": 1}"#, 400, "unknown parameter `temprature`"),
        (br#"{"prompt": "a", "temperature": "hot"}"#, 400, "`temperature`"),
        (br#"{"prompt": "a", "temperature": 7}"#, 400, "[0, 2]"),
        (br#"{"prompt": "a", "max_tokens": -1}"#, 400, "`max_tokens`"),
        (br#"{"prompt": "a", "max_tokens": 100000}"#, 400, "at most 4096"),
        (br#"{"prompt": [99999999]}"#, 400, "out of range"),
        (br#"{"prompt": ""}"#, 400, "empty"),
        (br#"{"prompt": {"x": 1}}"#, 400, "`prompt` must be"),
        (br#"{"max_tokens": 3}"#, 400, "`prompt` is required"),
        (br#"{"prompt": "a", "model": "gpt-4"}"#, 404, "not served here"),
        (br#"{"prompt": "a", "n": 0}"#, 400, "`n`"),
        (br#"{"prompt": "a", "stop": ["", "x"]}"#, 400, "`stop`"),
        (br#"{"prompt": "a", "presence_penalty": 1}"#, 400, "not supported"),
    ] {
        let (st, msg) = call(body, &auth);
        assert_eq!(st, status, "{}: {msg}", String::from_utf8_lossy(body));
        assert!(msg.contains(says), "{}: {msg}", String::from_utf8_lossy(body));
    }
    assert_eq!(call(&vec![b' '; 20000], &auth).0, 413);
    let (st, t) = http(&s.addr, "POST", "/v1/chat/completions", &auth, br#"{"messages": [{"role": "user"}]}"#);
    assert!(st == 400 && t.contains("messages[0]"), "{t}");
    assert_eq!(http(&s.addr, "GET", "/nowhere", &auth, b"").0, 404);
    // Still serving.
    let (st, t) = http(
        &s.addr,
        "POST",
        "/v1/completions",
        &auth,
        br#"{"prompt": "ROMEO:", "max_tokens": 3, "n": 2, "logprobs": 2}"#,
    );
    let v: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(st, 200, "{t}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][0]["logprobs"]["top_logprobs"][0].as_object().unwrap().len(), 2, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 6);
}
