//! Token shards as `prepare` writes them: `DIR/train.bin` and `DIR/val.bin` (flat little-endian
//! ids, u16 when the vocabulary fits, else u32; documents separated by the EOS id),
//! `DIR/meta.json` and `DIR/tokenizer.json`. Read memory-mapped; batches walk the stream in
//! order from a position the checkpoint keeps.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `DIR/meta.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// "u16" or "u32".
    pub dtype: String,
    pub vocab_size: usize,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub eos_id: u32,
    /// Documents and where the tokenizer came from (informational).
    #[serde(default)]
    pub documents: u64,
    #[serde(default)]
    pub tokenizer: String,
}

/// One memory-mapped shard of token ids.
pub struct Shard {
    map: memmap2::Mmap,
    wide: bool,
    pub path: PathBuf,
}

impl Shard {
    fn open(path: &Path, wide: bool, tokens: u64, vocab: usize) -> Result<Shard> {
        let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // The file is ours for the run: nothing rewrites it while mapped.
        let map = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
        let size = if wide { 4 } else { 2 };
        if map.len() as u64 != tokens * size {
            bail!(
                "{}: {} bytes, but meta.json says {tokens} tokens of {size} bytes ({} bytes): truncated or from another run",
                path.display(),
                map.len(),
                tokens * size
            );
        }
        let s = Shard { map, wide, path: path.to_path_buf() };
        if let Some(i) = (0..s.len()).find(|&i| s.get(i) as usize >= vocab) {
            bail!("{}: token {i} is id {}, past the vocabulary of {vocab} (meta.json)", path.display(), s.get(i));
        }
        Ok(s)
    }

    pub fn len(&self) -> usize {
        self.map.len() / if self.wide { 4 } else { 2 }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        if self.wide {
            u32::from_le_bytes(self.map[4 * i..4 * i + 4].try_into().expect("4 bytes"))
        } else {
            u16::from_le_bytes(self.map[2 * i..2 * i + 2].try_into().expect("2 bytes")) as u32
        }
    }
}

/// A prepared data directory.
pub struct Data {
    pub dir: PathBuf,
    pub meta: Meta,
    pub train: Shard,
    pub val: Shard,
}

impl Data {
    pub fn open(dir: &Path) -> Result<Data> {
        let mp = dir.join("meta.json");
        let text = std::fs::read_to_string(&mp)
            .with_context(|| format!("cannot read {} (make the directory with `mamba-lm prepare`)", mp.display()))?;
        let meta: Meta =
            serde_json::from_str(&text).with_context(|| format!("{}: not a data description", mp.display()))?;
        let wide = match meta.dtype.as_str() {
            "u16" => false,
            "u32" => true,
            d => bail!("{}: dtype {d:?}, expected \"u16\" or \"u32\"", mp.display()),
        };
        if !wide && meta.vocab_size > 1 << 16 {
            bail!("{}: a vocabulary of {} does not fit u16 ids", mp.display(), meta.vocab_size);
        }
        let train = Shard::open(&dir.join("train.bin"), wide, meta.train_tokens, meta.vocab_size)?;
        let val = Shard::open(&dir.join("val.bin"), wide, meta.val_tokens, meta.vocab_size)?;
        Ok(Data { dir: dir.to_path_buf(), meta, train, val })
    }
}

/// Where the next batch starts in the training stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub token: u64,
    pub epoch: u64,
}

/// Batches of `seqs` rows of `len + 1` tokens: consecutive windows of the stream (each row's
/// last token is the next row's first), `seqs·len` tokens further each batch, back to the start
/// when the stream runs out.
pub fn next_batch(shard: &Shard, pos: &mut Position, seqs: usize, len: usize) -> Result<Vec<u32>> {
    let need = seqs * len + 1;
    if shard.len() < need {
        bail!(
            "{} holds {} tokens; a batch of {seqs} × {len} needs {need}: lower --batch-size or --seq-len",
            shard.path.display(),
            shard.len()
        );
    }
    if pos.token as usize + need > shard.len() {
        *pos = Position { token: 0, epoch: pos.epoch + 1 };
    }
    let start = pos.token as usize;
    let mut out = Vec::with_capacity(seqs * (len + 1));
    for s in 0..seqs {
        out.extend((start + s * len..start + s * len + len + 1).map(|i| shard.get(i)));
    }
    pos.token += (seqs * len) as u64;
    Ok(out)
}
