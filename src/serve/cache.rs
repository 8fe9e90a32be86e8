//! Prefix states: a prompt's state after its first k tokens, reusable by any later prompt that
//! starts with those tokens. Mamba's state has the same size whatever k is, so a cached prefix
//! of 2,000 tokens costs what one of 20 does. Entries are made at the end of each prompt and
//! at the point where a new prompt leaves a cached one (the shared system prompt or few-shot
//! header), and evicted least recently used first under a byte budget.

use mamba_lm::Snapshot;

/// Prefixes shorter than this are not worth a state.
pub const MIN_PREFIX: usize = 16;

struct Entry {
    snap: Snapshot,
    bytes: usize,
    used: u64,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    bytes: usize,
    limit: usize,
    clock: u64,
}

fn bytes(s: &Snapshot) -> usize {
    s.state.bytes() + 4 * (s.next_logits.len() + s.tokens.len())
}

fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    pub fn new(limit: usize) -> PrefixCache {
        PrefixCache { entries: Vec::new(), bytes: 0, limit, clock: 0 }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether anything may be cached (`--cache-mb 0` turns the cache off).
    pub fn enabled(&self) -> bool {
        self.limit > 0
    }

    /// The longest cached prefix of `prompt` (at most all of it), as a snapshot to resume.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<Snapshot> {
        self.clock += 1;
        let e = self
            .entries
            .iter_mut()
            .filter(|e| e.snap.tokens.len() <= prompt.len() && prompt.starts_with(&e.snap.tokens))
            .max_by_key(|e| e.snap.tokens.len())?;
        e.used = self.clock;
        Some(e.snap.clone())
    }

    /// How far `prompt` runs along the cached prompt it shares most with.
    pub fn shared(&self, prompt: &[u32]) -> usize {
        self.entries.iter().map(|e| common(&e.snap.tokens, prompt)).max().unwrap_or(0)
    }

    pub fn insert(&mut self, snap: Snapshot) {
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.snap.tokens == snap.tokens) {
            e.used = self.clock;
            return;
        }
        let b = bytes(&snap);
        if b > self.limit {
            return;
        }
        self.entries.push(Entry { snap, bytes: b, used: self.clock });
        self.bytes += b;
        while self.bytes > self.limit {
            let (k, _) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.used).unwrap();
            self.bytes -= self.entries.swap_remove(k).bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mamba_lm::state::{Kept, LayerState, Ssm, State};

    fn snap(tokens: Vec<u32>) -> Snapshot {
        let state = State {
            layers: vec![LayerState { conv: vec![0.0; 6], ssm: Ssm::F32(vec![tokens.len() as f32; 10]) }],
            pos: 0,
        };
        Snapshot { state: Kept::Host(state), next_logits: vec![0.0; 8], tokens }
    }

    #[test]
    fn longest_prefix_wins_and_the_least_recent_goes_first() {
        let entry = bytes(&snap(vec![0; 20]));
        let mut c = PrefixCache::new(2 * entry + 4 * 10);
        c.insert(snap((0..20).collect()));
        c.insert(snap((0..10).collect()));
        let prompt: Vec<u32> = (0..30).collect();
        assert_eq!(c.lookup(&prompt).unwrap().tokens.len(), 20);
        assert_eq!(c.lookup(&prompt[..15]).unwrap().tokens.len(), 10);
        assert!(c.lookup(&[1, 2, 3]).is_none());
        assert_eq!(c.shared(&[0, 1, 2, 9]), 3);
        // Over budget: the entry used least recently (the 20-token one) is evicted.
        c.insert(snap((100..120).collect()));
        assert_eq!(c.lookup(&prompt).unwrap().tokens.len(), 10);
        assert!(c.bytes() <= 2 * entry + 40);
    }
}
