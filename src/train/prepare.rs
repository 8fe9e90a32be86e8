//! `prepare`: text files → the token shards training reads (see [`super::data`]). Each input
//! file is one document; a `.jsonl` file holds one document per line in its `"text"` field.
//! Documents are shuffled by the seed, tokenized, joined by the EOS id, and the last
//! `val_fraction` of the stream becomes `val.bin`.

use super::data::Meta;
use anyhow::{anyhow, bail, Context, Result};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The special token that ends a document in a trained tokenizer.
pub const EOS: &str = "<|endoftext|>";

/// Reads the documents of `inputs` (text files and `.jsonl` files).
pub fn read_documents(inputs: &[PathBuf]) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for p in inputs {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {} (as UTF-8 text)", p.display()))?;
        if p.extension().is_some_and(|e| e == "jsonl") {
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not a JSON object", p.display(), i + 1))?;
                let t =
                    v["text"].as_str().ok_or_else(|| anyhow!("{}:{}: no \"text\" string field", p.display(), i + 1))?;
                docs.push(t.to_string());
            }
        } else {
            docs.push(text);
        }
    }
    if docs.iter().all(|d| d.is_empty()) {
        bail!("the inputs hold no text");
    }
    Ok(docs)
}

/// A byte-level BPE tokenizer of `vocab_size` entries (EOS included) trained on `docs`.
pub fn train_tokenizer(docs: &[String], vocab_size: usize) -> Result<Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, NormalizerWrapper, TokenizerBuilder};
    if vocab_size < 257 {
        bail!("--vocab-size must be at least 257 (256 bytes and the end-of-text token), got {vocab_size}");
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_post_processor(Some(ByteLevel::default().trim_offsets(false)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| anyhow!("tokenizer: {e}"))?;
    tok.train(&mut trainer, docs.iter()).map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    let json = tok.to_string(false).map_err(|e| anyhow!("tokenizer: {e}"))?;
    json.parse().map_err(|e| anyhow!("tokenizer: {e}"))
}

/// Tokenizes `docs` with `tok` and writes `out/{train,val}.bin`, `meta.json` and
/// `tokenizer.json`. `out` must not exist or be empty. Returns the description written.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    docs: Vec<String>,
    tok: &Tokenizer,
    tokenizer_source: &str,
    eos_id: u32,
    val_fraction: f64,
    seed: u64,
    out: &Path,
    mut on_doc: impl FnMut(usize),
) -> Result<Meta> {
    if !(0.0..1.0).contains(&val_fraction) {
        bail!("--val-fraction must be in [0, 1), got {val_fraction}");
    }
    if std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(false) {
        bail!("{} already exists and is not empty: choose another --out", out.display());
    }
    let vocab = tok.get_vocab_size(true);
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut ids: Vec<u32> = Vec::new();
    for &i in &order {
        ids.extend(crate::tokenizer::encode(tok, &docs[i])?);
        ids.push(eos_id);
        on_doc(docs[i].len());
    }
    let val = (ids.len() as f64 * val_fraction).round() as usize;
    let (train, valid) = ids.split_at(ids.len() - val);
    let wide = vocab > 1 << 16;
    let bytes = |v: &[u32]| -> Vec<u8> {
        if wide {
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        } else {
            v.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect()
        }
    };
    let meta = Meta {
        dtype: if wide { "u32" } else { "u16" }.to_string(),
        vocab_size: vocab,
        train_tokens: train.len() as u64,
        val_tokens: valid.len() as u64,
        eos_id,
        documents: docs.len() as u64,
        tokenizer: tokenizer_source.to_string(),
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let json = tok.to_string(false).map_err(|e| anyhow!("tokenizer: {e}"))?;
    crate::io::write_file(&out.join("tokenizer.json"), json.as_bytes(), false)?;
    crate::io::write_file(&out.join("train.bin"), &bytes(train), false)?;
    crate::io::write_file(&out.join("val.bin"), &bytes(valid), false)?;
    // meta.json last: a directory without it is not taken for prepared data.
    crate::io::write_file(&out.join("meta.json"), serde_json::to_string_pretty(&meta)?.as_bytes(), false)?;
    Ok(meta)
}
