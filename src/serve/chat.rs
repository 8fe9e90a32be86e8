//! Chat messages to prompt text: the model's own template (`chat_template` in its
//! tokenizer_config.json, or `--chat-template FILE`, Jinja as Hugging Face writes them), else a
//! plain one: each message as `Role: content` followed by a blank line, then `Assistant:`;
//! generation then stops where the model starts the user's next turn (`\nUser:`).

use anyhow::{anyhow, Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde_json::Value;
use std::path::Path;

pub struct ChatTemplate {
    jinja: Option<(Environment<'static>, String, String)>,
}

/// A special token's text, written as a string or as `{"content": ...}`.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// `explicit` (a Jinja file) or the model directory's tokenizer_config.json template.
    pub fn load(explicit: Option<&Path>, model_dir: &Path) -> Result<ChatTemplate> {
        let cfg_path = model_dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?,
            Err(_) => Value::Null,
        };
        let source = match explicit {
            Some(p) => {
                Some(std::fs::read_to_string(p).with_context(|| format!("cannot read chat template {}", p.display()))?)
            }
            None => match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: the default one.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(String::from)),
                _ => None,
            },
        };
        let Some(source) = source else { return Ok(ChatTemplate { jinja: None }) };
        let mut env = Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source).map_err(|e| anyhow!("the chat template does not parse: {e}"))?;
        Ok(ChatTemplate { jinja: Some((env, token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token")))) })
    }

    /// Stop strings the template implies.
    pub fn stops(&self) -> Vec<String> {
        match self.jinja {
            Some(_) => vec![],
            None => vec!["\nUser:".to_string()],
        }
    }

    /// The prompt for `messages` (each with a role and text content), ready for the
    /// assistant's reply.
    pub fn render(&self, messages: &[(String, String)]) -> Result<String, String> {
        match &self.jinja {
            Some((env, bos, eos)) => {
                let msgs: Vec<Value> =
                    messages.iter().map(|(r, c)| serde_json::json!({"role": r, "content": c})).collect();
                let t = env.get_template("chat").map_err(|e| e.to_string())?;
                t.render(context! { messages => minijinja::Value::from(minijinja::value::Serde(&msgs)), add_generation_prompt => true, bos_token => bos, eos_token => eos })
                    .map_err(|e| format!("the chat template failed on these messages: {e}"))
            }
            None => {
                let mut s = String::new();
                for (role, content) in messages {
                    let mut r = role.chars();
                    let role: String = r.next().map(|c| c.to_uppercase().chain(r).collect()).unwrap_or_default();
                    s.push_str(&format!("{role}: {content}\n\n"));
                }
                s.push_str("Assistant:");
                Ok(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_jinja_templates() {
        let dir = tempfile::tempdir().unwrap();
        let plain = ChatTemplate::load(None, dir.path()).unwrap();
        let msgs = vec![("system".to_string(), "Be brief.".to_string()), ("user".to_string(), "Hi".to_string())];
        assert_eq!(plain.render(&msgs).unwrap(), "System: Be brief.\n\nUser: Hi\n\nAssistant:");
        let cfg = r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template":
            "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"}"#;
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg).unwrap();
        let t = ChatTemplate::load(None, dir.path()).unwrap();
        assert_eq!(t.render(&msgs).unwrap(), "<s><|system|>Be brief.</s><|user|>Hi</s><|assistant|>");
        assert!(t.stops().is_empty());
    }
}
