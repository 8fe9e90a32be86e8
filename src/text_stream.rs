//! Generated text as it comes, in time linear in the output: an incremental detokenizer over a
//! short window of recent ids, and stop strings matched on the newest text only.

use crate::tokenizer::{self, Tokenizer};
use anyhow::Result;

/// Turns token ids into text one id at a time. Each step decodes only a window: the ids of the
/// last piece it emitted (context, so decoders that drop a leading space see where they are)
/// and the ids not yet emitted; it emits what the new ids add to the text once that no longer
/// ends in an incomplete UTF-8 character (U+FFFD). The pieces, followed by [`Detokenizer::finish`],
/// are exactly the full decode of all the ids: byte-level BPE decodes to bytes that are
/// concatenated before UTF-8 decoding, and the window only moves past a point where what
/// precedes it is complete, which a lossy decode never revises.
pub struct Detokenizer<'t> {
    tok: &'t Tokenizer,
    /// `ids[..read]` are emitted, of which `ids[..prefix]` are no longer needed as context.
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl<'t> Detokenizer<'t> {
    pub fn new(tok: &'t Tokenizer) -> Detokenizer<'t> {
        Detokenizer { tok, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Adds one id; returns the text it completes (often empty mid-character).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let (before, now) = self.window()?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(piece) = now.get(before.len()..) else { return Ok(String::new()) };
        let piece = piece.to_string();
        // The emitted ids become the next window's context; older ones are dropped.
        self.ids.drain(..self.read);
        self.prefix = 0;
        self.read = self.ids.len();
        Ok(piece)
    }

    /// The text held back (an incomplete character at the end, decoded as U+FFFD as a full
    /// decode would); the stream is then empty.
    pub fn finish(&mut self) -> Result<String> {
        let (before, now) = self.window()?;
        let rest = now.get(before.len()..).unwrap_or("").to_string();
        self.ids.clear();
        (self.prefix, self.read) = (0, 0);
        Ok(rest)
    }

    /// The window's text without and with the ids not yet emitted.
    fn window(&self) -> Result<(String, String)> {
        let before = tokenizer::decode(self.tok, &self.ids[self.prefix..self.read])?;
        let now = tokenizer::decode(self.tok, &self.ids[self.prefix..])?;
        Ok((before, now))
    }
}

/// One sequence's text: detokenized incrementally, with the text that could still be the start
/// of a stop string held back until it is decided. Stop strings are looked for only in the held
/// text plus the newest piece: a match must end in the newest piece (else it was found
/// before) and starts at most `longest stop − 1` bytes before it, which is what is held.
pub struct TextStream<'t> {
    detok: Detokenizer<'t>,
    stops: Vec<String>,
    hold: usize,
    /// Decoded but not yet released.
    pending: String,
    /// Everything released so far.
    text: String,
    stopped: bool,
}

impl<'t> TextStream<'t> {
    pub fn new(tok: &'t Tokenizer, stops: &[String]) -> TextStream<'t> {
        let hold = stops.iter().map(|s| s.len()).max().unwrap_or(1).saturating_sub(1);
        TextStream {
            detok: Detokenizer::new(tok),
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            hold,
            pending: String::new(),
            text: String::new(),
            stopped: false,
        }
    }

    /// Adds a token; returns the text now final (to show) and whether a stop string was hit,
    /// in which case the text ends just before it and later tokens are ignored.
    pub fn push(&mut self, id: u32) -> Result<(String, bool)> {
        if self.stopped {
            return Ok((String::new(), true));
        }
        let piece = self.detok.push(id)?;
        self.pending.push_str(&piece);
        if self.cut_at_stop() {
            return Ok((self.release(self.pending.len()), true));
        }
        let mut safe = self.pending.len().saturating_sub(self.hold);
        while !self.pending.is_char_boundary(safe) {
            safe -= 1;
        }
        Ok((self.release(safe), false))
    }

    /// Ends the sequence (end-of-sequence token or length limit): releases what was held.
    pub fn finish(&mut self) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let rest = self.detok.finish()?;
        self.pending.push_str(&rest);
        self.stopped = self.cut_at_stop();
        let out = self.release(self.pending.len());
        self.stopped = true;
        Ok(out)
    }

    /// The text released so far (all of it once the sequence has finished).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Truncates `pending` at the first stop string in it; whether there was one.
    fn cut_at_stop(&mut self) -> bool {
        match self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            Some(at) => {
                self.pending.truncate(at);
                self.stopped = true;
                true
            }
            None => false,
        }
    }

    fn release(&mut self, upto: usize) -> String {
        let out: String = self.pending.drain(..upto).collect();
        self.text.push_str(&out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn streamed(tok: &Tokenizer, ids: &[u32]) -> String {
        let mut d = Detokenizer::new(tok);
        let mut s: String = ids.iter().map(|&i| d.push(i).unwrap()).collect();
        s.push_str(&d.finish().unwrap());
        s
    }

    #[test]
    fn incremental_decode_equals_full_decode_on_random_ids() {
        let tok = tokenizer::neox();
        let mut rng = StdRng::seed_from_u64(11);
        for n in [1, 2, 7, 50, 400] {
            for _ in 0..20 {
                // Byte tokens (ids 0..256 hold the 256 bytes in byte-level BPE) are drawn often,
                // so partial and invalid UTF-8 sequences come up.
                let ids: Vec<u32> = (0..n)
                    .map(|_| if rng.random_bool(0.5) { rng.random_range(0..256) } else { rng.random_range(0..50277) })
                    .collect();
                assert_eq!(streamed(&tok, &ids), tokenizer::decode(&tok, &ids).unwrap(), "{ids:?}");
            }
        }
    }

    #[test]
    fn multibyte_characters_come_out_whole() {
        let tok = tokenizer::neox();
        let text = "naïve café — 東京 🦀 ok";
        let ids = tokenizer::encode(&tok, text).unwrap();
        let mut d = Detokenizer::new(&tok);
        for &i in &ids {
            let piece = d.push(i).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "a partial character was emitted: {piece:?}");
        }
        assert_eq!(d.finish().unwrap(), "");
        assert_eq!(streamed(&tok, &ids), text);
    }

    /// One token per byte, so every multi-byte character arrives in pieces.
    fn byte_ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
        let vocab = tok.get_vocab(true);
        // Byte-level BPE spells each byte as a printable character (GPT-2's byte map).
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut extra = 0u32;
        let mut map = [0u32; 256];
        for b in 0..=255u8 {
            map[b as usize] = if printable(b) {
                b as u32
            } else {
                extra += 1;
                255 + extra
            };
        }
        text.bytes()
            .map(|b| {
                let c = char::from_u32(map[b as usize]).unwrap().to_string();
                vocab[&c]
            })
            .collect()
    }

    #[test]
    fn stop_strings_are_found_across_tokens_and_characters() {
        let tok = tokenizer::neox();
        let text = "Once upon a time, the end. THE END — fin";
        for ids in [tokenizer::encode(&tok, text).unwrap(), byte_ids(&tok, text)] {
            assert_eq!(streamed(&tok, &ids), text);
            for (stop, want) in [
                ("the end", "Once upon a time, "),
                ("END —", "Once upon a time, the end. THE "),
                ("—", "Once upon a time, the end. THE END "),
                ("absent", text),
            ] {
                let mut s = TextStream::new(&tok, &[stop.to_string(), "never".to_string()]);
                let mut shown = String::new();
                let mut hit = false;
                for &i in &ids {
                    let (piece, stop) = s.push(i).unwrap();
                    shown.push_str(&piece);
                    if stop {
                        hit = true;
                        break;
                    }
                }
                shown.push_str(&s.finish().unwrap());
                assert_eq!(shown, want, "stop {stop:?}");
                assert_eq!(s.text(), want);
                assert_eq!(hit, want != text);
            }
        }
    }
}
