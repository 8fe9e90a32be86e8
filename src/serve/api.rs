//! OpenAI's request fields, checked one by one: a wrong type, an out-of-range value or an
//! unknown field is a 400 with an OpenAI-style error object naming the field.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mamba_lm::sampling::Sampling;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param: Some(param.to_string()) }
    }

    pub fn status(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), param: None }
    }

    /// The model's thread refused a sequence or failed, with this HTTP status.
    pub fn engine(status: u16, message: String) -> ApiError {
        ApiError::status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), message)
    }

    /// The error object, as a response body or a stream's last event.
    pub fn body(&self) -> Value {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": null}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        r
    }
}

/// A request body's fields, taken one at a time; what is left at the end is unknown.
pub struct Body(Map<String, Value>);

impl Body {
    pub fn parse(bytes: &[u8]) -> Result<Body, ApiError> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(m)) => Ok(Body(m)),
            Ok(_) => Err(ApiError::bad("body", "the request body must be a JSON object")),
            Err(e) => Err(ApiError::bad("body", format!("the request body is not valid JSON: {e}"))),
        }
    }

    /// The field `key` (absent and null alike give None).
    pub fn take<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, ApiError> {
        match self.0.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v).map(Some).map_err(|e| ApiError::bad(key, format!("`{key}`: {e}"))),
        }
    }

    /// Refuses fields nobody took.
    pub fn finish(self) -> Result<(), ApiError> {
        match self.0.keys().next() {
            Some(k) => Err(ApiError::bad(k, format!("unknown parameter `{k}`"))),
            None => Ok(()),
        }
    }
}

/// `max_tokens`, the sampling fields, `seed`, `n`, `stop`, `stream` and `session`: what
/// completions and chat share.
pub struct Common {
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub seed: Option<u64>,
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub session: Option<String>,
    /// Generate past the end-of-sequence token (for benchmarks: always `max_tokens`).
    pub ignore_eos: bool,
}

/// Limits from the server's flags.
pub struct Limits {
    pub max_tokens: usize,
    pub default_max_tokens: usize,
    pub max_n: usize,
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(key: &str, v: T, lo: T, hi: T) -> Result<T, ApiError> {
    if v >= lo && v <= hi {
        Ok(v)
    } else {
        Err(ApiError::bad(key, format!("`{key}` must be in [{lo}, {hi}], got {v}")))
    }
}

pub fn common(b: &mut Body, lim: &Limits, max_tokens_key: &str) -> Result<Common, ApiError> {
    let max_tokens = b.take::<usize>(max_tokens_key)?.unwrap_or(lim.default_max_tokens.min(lim.max_tokens));
    if max_tokens > lim.max_tokens {
        return Err(ApiError::bad(
            max_tokens_key,
            format!("`{max_tokens_key}` is {max_tokens}; this server allows at most {}", lim.max_tokens),
        ));
    }
    let temperature = range("temperature", b.take::<f32>("temperature")?.unwrap_or(1.0), 0.0, 2.0)?;
    let top_p = range("top_p", b.take::<f32>("top_p")?.unwrap_or(1.0), 0.0, 1.0)?;
    let top_k = b.take::<usize>("top_k")?.unwrap_or(0);
    let min_p = range("min_p", b.take::<f32>("min_p")?.unwrap_or(0.0), 0.0, 1.0)?;
    let repetition_penalty =
        range("repetition_penalty", b.take::<f32>("repetition_penalty")?.unwrap_or(1.0), 0.01, 100.0)?;
    for key in ["presence_penalty", "frequency_penalty"] {
        if b.take::<f32>(key)?.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad(key, format!("`{key}` is not supported (use repetition_penalty)")));
        }
    }
    b.take::<String>("user")?;
    let n = range("n", b.take::<usize>("n")?.unwrap_or(1), 1, lim.max_n)?;
    let stop = match b.take::<Value>("stop")? {
        None => vec![],
        Some(Value::String(s)) => vec![s],
        Some(v) => serde_json::from_value::<Vec<String>>(v)
            .map_err(|_| ApiError::bad("stop", "`stop` must be a string or a list of strings"))?,
    };
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad("stop", "`stop` takes up to 4 non-empty strings"));
    }
    let stream = b.take::<bool>("stream")?.unwrap_or(false);
    let include_usage = match b.take::<Map<String, Value>>("stream_options")? {
        Some(mut o) => {
            let v = o.remove("include_usage").map(|v| v.as_bool().ok_or(()));
            if !o.is_empty() || v.is_some_and(|v| v.is_err()) {
                return Err(ApiError::bad("stream_options", "`stream_options` takes only `include_usage` (a boolean)"));
            }
            v.is_some_and(|v| v == Ok(true))
        }
        None => false,
    };
    let seed = b.take::<u64>("seed")?;
    let session = b.take::<String>("session")?;
    let ignore_eos = b.take::<bool>("ignore_eos")?.unwrap_or(false);
    if session.as_ref().is_some_and(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::bad("session", "`session` must be a name of 1 to 256 bytes"));
    }
    // OpenAI's default is plain sampling at temperature 1 (mamba_ssm's is greedy).
    let sampling = Sampling { temperature, top_k, top_p, min_p, repetition_penalty };
    Ok(Common { max_tokens, sampling, seed, n, stop, stream, include_usage, session, ignore_eos })
}

pub fn finish_reason(f: mamba_lm::scheduler::Finish) -> &'static str {
    use mamba_lm::scheduler::Finish::*;
    match f {
        Length => "length",
        Eos | Stop => "stop",
        Cancelled => "abort",
    }
}
