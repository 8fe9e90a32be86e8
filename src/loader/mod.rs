//! Checkpoint reading: resolve a model directory (local or Hugging Face cache/hub), index the
//! tensors of its weight files (safetensors, sharded safetensors, PyTorch zip), and convert
//! them, validated against the expected shapes, into the storage type the model runs in.

pub mod default_model;
pub mod hub;
pub mod pickle;

use crate::ops::q8::{Q8, QBLOCK};
use crate::tensor::{weight_vec, DType, Matrix, Store};
use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Element types a checkpoint may store weights in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrcDType {
    F32,
    F16,
    BF16,
    F64,
    /// 8-bit values of a quantized matrix, its block scales in `<name>_scale` (see `quantize`).
    I8,
}

impl SrcDType {
    pub fn size(self) -> usize {
        match self {
            SrcDType::F32 => 4,
            SrcDType::F16 | SrcDType::BF16 => 2,
            SrcDType::F64 => 8,
            SrcDType::I8 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SrcDType::F32 => "f32",
            SrcDType::F16 => "f16",
            SrcDType::BF16 => "bf16",
            SrcDType::F64 => "f64",
            SrcDType::I8 => "int8",
        }
    }
}

/// Bytes backing tensors: a memory-mapped file or an owned buffer.
enum Blob {
    Mapped(Arc<Mmap>, usize, usize),
    Owned(Vec<u8>),
}

impl Blob {
    fn bytes(&self) -> &[u8] {
        match self {
            Blob::Mapped(m, start, len) => &m[*start..*start + *len],
            Blob::Owned(v) => v,
        }
    }
}

struct Entry {
    dtype: SrcDType,
    shape: Vec<usize>,
    /// Element strides; `None` when the data is contiguous row-major.
    stride: Option<Vec<usize>>,
    blob: usize,
    /// Byte offset into the blob.
    offset: usize,
    file: PathBuf,
}

/// An index of the tensors of one checkpoint.
#[derive(Default)]
pub struct Checkpoint {
    blobs: Vec<Blob>,
    entries: BTreeMap<String, Entry>,
    pub files: Vec<PathBuf>,
}

fn mmap(path: &Path) -> Result<Arc<Mmap>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // Safety: the file is opened read-only; as with every mmap-based loader, a concurrent
    // writer truncating it would be undefined behaviour, which we document rather than guard.
    let m = unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
    Ok(Arc::new(m))
}

impl Checkpoint {
    /// Finds and indexes the weights in `dir`: `model.safetensors`, a sharded
    /// `model.safetensors.index.json`, or `pytorch_model.bin`.
    pub fn open_dir(dir: &Path) -> Result<Checkpoint> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let torch = dir.join("pytorch_model.bin");
        let mut ck = Checkpoint::default();
        if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{} has no weight_map object", index.display()))?;
            let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
            shards.sort();
            shards.dedup();
            for s in shards {
                if s.contains('/') || s.contains('\\') || s.starts_with('.') {
                    bail!("{}: shard name '{s}' is not a plain file name", index.display());
                }
                ck.add_safetensors(&dir.join(s))?;
            }
            for name in map.keys() {
                if !ck.entries.contains_key(name) {
                    bail!("{}: tensor {name} is listed but missing from its shard", index.display());
                }
            }
        } else if single.exists() {
            ck.add_safetensors(&single)?;
        } else if torch.exists() {
            ck.add_torch_zip(&torch)?;
        } else {
            bail!(
                "no weights in {}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin",
                dir.display()
            );
        }
        Ok(ck)
    }

    /// Indexes one safetensors file.
    pub fn add_safetensors(&mut self, path: &Path) -> Result<()> {
        let map = mmap(path)?;
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
        let base = map.as_ptr() as usize;
        let blob = self.blobs.len();
        let mut new = Vec::new();
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => SrcDType::F32,
                safetensors::Dtype::F16 => SrcDType::F16,
                safetensors::Dtype::BF16 => SrcDType::BF16,
                safetensors::Dtype::F64 => SrcDType::F64,
                safetensors::Dtype::I8 => SrcDType::I8,
                other => bail!("{}: tensor {name} has unsupported dtype {other:?}", path.display()),
            };
            let offset = view.data().as_ptr() as usize - base;
            new.push((
                name,
                Entry { dtype, shape: view.shape().to_vec(), stride: None, blob, offset, file: path.into() },
            ));
        }
        drop(st);
        let len = map.len();
        self.blobs.push(Blob::Mapped(map, 0, len));
        for (name, e) in new {
            if self.entries.insert(name.clone(), e).is_some() {
                bail!("{}: tensor {name} appears in more than one file", path.display());
            }
        }
        self.files.push(path.into());
        Ok(())
    }

    /// Indexes a PyTorch zip checkpoint (`torch.save` of a state dict), reading its pickle with
    /// the restricted unpickler.
    pub fn add_torch_zip(&mut self, path: &Path) -> Result<()> {
        let map = mmap(path)?;
        let ctx = || format!("{} is not a readable PyTorch checkpoint", path.display());
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&map[..])).with_context(ctx)?;
        let pkl_name = zip
            .file_names()
            .filter(|n| n.ends_with("data.pkl"))
            .min_by_key(|n| n.len())
            .map(str::to_owned)
            .ok_or_else(|| {
                anyhow!("{}: no data.pkl inside (legacy, non-zip torch.save files are not supported)", path.display())
            })?;
        let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
        if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut f, &mut s).with_context(ctx)?;
            if s.trim() != "little" {
                bail!("{}: byte order '{}' is not supported", path.display(), s.trim());
            }
        }
        let pkl = read_entry(&mut zip, &pkl_name).with_context(ctx)?;
        let refs = pickle::parse_state_dict(&pkl).with_context(|| format!("{}: data.pkl", path.display()))?;
        let mut storages: BTreeMap<String, usize> = BTreeMap::new();
        for t in refs {
            let blob = match storages.get(&t.key) {
                Some(&b) => b,
                None => {
                    let entry = format!("{prefix}data/{}", t.key);
                    let b = {
                        let f = zip
                            .by_name(&entry)
                            .with_context(|| format!("{}: storage {entry} missing", path.display()))?;
                        if f.compression() == zip::CompressionMethod::Stored {
                            let start = f.data_start() as usize;
                            let len = f.size() as usize;
                            if start.checked_add(len).is_none_or(|e| e > map.len()) {
                                bail!(
                                    "{}: storage {entry} extends past the end of the file (truncated?)",
                                    path.display()
                                );
                            }
                            Some(Blob::Mapped(map.clone(), start, len))
                        } else {
                            None
                        }
                    };
                    let b = match b {
                        Some(b) => b,
                        None => Blob::Owned(read_entry(&mut zip, &entry).with_context(ctx)?),
                    };
                    self.blobs.push(b);
                    storages.insert(t.key.clone(), self.blobs.len() - 1);
                    self.blobs.len() - 1
                }
            };
            let contiguous = row_major_strides(&t.shape) == t.stride;
            let e = Entry {
                dtype: t.dtype,
                offset: t.offset.checked_mul(t.dtype.size()).ok_or_else(|| anyhow!("{}: bad offset", t.name))?,
                stride: if contiguous { None } else { Some(t.stride) },
                shape: t.shape,
                blob,
                file: path.into(),
            };
            self.entries.insert(t.name, e);
        }
        self.files.push(path.into());
        Ok(())
    }

    /// Adds an in-memory f32 tensor (used for weights made by `init`).
    pub fn insert_f32(&mut self, name: &str, shape: Vec<usize>, data: &[f32]) {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.blobs.push(Blob::Owned(bytes));
        let e = Entry {
            dtype: SrcDType::F32,
            shape,
            stride: None,
            blob: self.blobs.len() - 1,
            offset: 0,
            file: "<memory>".into(),
        };
        self.entries.insert(name.to_owned(), e);
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The stored shape of a tensor, if present.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The stored dtype of a tensor, if present.
    pub fn dtype_of(&self, name: &str) -> Option<SrcDType> {
        self.entries.get(name).map(|e| e.dtype)
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let e = self.entries.get(name).ok_or_else(|| {
            let files: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
            anyhow!("tensor {name} not found in {}", files.join(", "))
        })?;
        if e.shape != shape {
            bail!("{}: tensor {name} has shape {:?}, expected {:?} from the config", e.file.display(), e.shape, shape);
        }
        Ok(e)
    }

    /// Raw little-endian element bytes of a tensor in row-major order.
    fn raw(&self, name: &str, e: &Entry) -> Result<std::borrow::Cow<'_, [u8]>> {
        let bytes = self.blobs[e.blob].bytes();
        let sz = e.dtype.size();
        let numel: usize = e.shape.iter().product();
        let oob =
            || anyhow!("{}: tensor {name} data lies outside its storage (truncated or corrupt file)", e.file.display());
        match &e.stride {
            None => {
                let end = numel.checked_mul(sz).and_then(|n| n.checked_add(e.offset)).ok_or_else(oob)?;
                Ok(std::borrow::Cow::Borrowed(bytes.get(e.offset..end).ok_or_else(oob)?))
            }
            Some(stride) => {
                let mut out = Vec::with_capacity(numel * sz);
                let mut idx = vec![0usize; e.shape.len()];
                for _ in 0..numel {
                    let el: usize = idx.iter().zip(stride).map(|(i, s)| i * s).sum();
                    let at = e.offset + el * sz;
                    out.extend_from_slice(bytes.get(at..at + sz).ok_or_else(oob)?);
                    for d in (0..idx.len()).rev() {
                        idx[d] += 1;
                        if idx[d] < e.shape[d] {
                            break;
                        }
                        idx[d] = 0;
                    }
                }
                Ok(std::borrow::Cow::Owned(out))
            }
        }
    }

    /// A tensor of the given shape widened to f32; rejects NaN and infinity.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let e = self.entry(name, shape)?;
        if e.dtype == SrcDType::I8 {
            let q = self.q8(name, shape)?;
            let mut v = vec![0.0; q.len()];
            q.read_f32(0, &mut v);
            return Ok(v);
        }
        let raw = self.raw(name, e)?;
        let v: Vec<f32> = match e.dtype {
            SrcDType::I8 => unreachable!("dequantized above"),
            SrcDType::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            SrcDType::F64 => raw.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            SrcDType::F16 => raw.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            SrcDType::BF16 => raw.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        };
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!("{}: tensor {name} contains a non-finite value ({}) at flat index {i}", e.file.display(), v[i]);
        }
        Ok(v)
    }

    /// A 2-D tensor as a [`Matrix`] stored in `dtype`. Half-precision data already in `dtype`
    /// is copied bit for bit.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize, dtype: DType) -> Result<Matrix> {
        self.matrix_shaped(name, &[rows, cols], rows, cols, dtype)
    }

    /// Like [`Checkpoint::matrix`] for a tensor stored with another shape of the same size
    /// (a conv weight `(C, 1, W)`, say).
    /// 8-bit storage: an 8-bit tensor as it is, others quantized; matrices whose rows are not
    /// whole blocks of [`QBLOCK`] (Mamba-1's dt_proj, say) run in bf16.
    pub fn matrix_shaped(&self, name: &str, shape: &[usize], rows: usize, cols: usize, dtype: DType) -> Result<Matrix> {
        let e = self.entry(name, shape)?;
        if dtype == DType::I8 {
            let store = match (cols % QBLOCK, e.dtype) {
                (0, SrcDType::I8) => Store::I8(self.q8(name, shape)?),
                (0, _) => Store::I8(Q8::quantize(&self.f32(name, shape)?)),
                _ => Store::from_f32(self.f32(name, shape)?, DType::BF16),
            };
            return Ok(Matrix::new(rows, cols, store));
        }
        let same = matches!((e.dtype, dtype), (SrcDType::BF16, DType::BF16) | (SrcDType::F16, DType::F16));
        let store = if same {
            let raw = self.raw(name, e)?;
            let bits = raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
            let n = raw.len() / 2;
            let store = match dtype {
                DType::BF16 => Store::BF16(weight_vec(n, bits.map(bf16::from_bits))),
                _ => Store::F16(weight_vec(n, bits.map(f16::from_bits))),
            };
            if store.to_f32_vec().iter().any(|x| !x.is_finite()) {
                bail!("{}: tensor {name} contains a non-finite value", e.file.display());
            }
            store
        } else {
            Store::from_f32(self.f32(name, shape)?, dtype)
        };
        Ok(Matrix::new(rows, cols, store))
    }
}

impl Checkpoint {
    /// The scales' tensor of 8-bit tensor `name`.
    pub fn scale_name(name: &str) -> String {
        format!("{name}_scale")
    }

    /// Whether `name` is the scales' tensor of an 8-bit tensor.
    pub fn is_scale(&self, name: &str) -> bool {
        name.strip_suffix("_scale").is_some_and(|base| self.dtype_of(base) == Some(SrcDType::I8))
    }

    /// 8-bit tensor `name` of `shape` (rows of whole blocks) with its block scales.
    fn q8(&self, name: &str, shape: &[usize]) -> Result<Q8> {
        let e = self.entry(name, shape)?;
        let cols = *shape.last().unwrap_or(&0);
        if !cols.is_multiple_of(QBLOCK) {
            bail!("{}: 8-bit tensor {name} has rows of {cols}, not whole blocks of {QBLOCK}", e.file.display());
        }
        let q: Vec<i8> = self.raw(name, e)?.iter().map(|&b| b as i8).collect();
        if let Some(i) = q.iter().position(|&v| v == -128) {
            bail!("{}: 8-bit tensor {name} holds -128 at flat index {i} (values are in [-127, 127])", e.file.display());
        }
        let scales = Checkpoint::scale_name(name);
        let d = self.f32(&scales, &[q.len() / cols, cols / QBLOCK])?;
        if let Some(i) = d.iter().position(|&v| v < 0.0) {
            bail!("{}: scales {scales} hold a negative value at flat index {i}", e.file.display());
        }
        Ok(Q8 { q: weight_vec(q.len(), q.into_iter()), d })
    }
}

fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn read_entry<R: std::io::Read + std::io::Seek>(zip: &mut zip::ZipArchive<R>, name: &str) -> Result<Vec<u8>> {
    let mut f = zip.by_name(name).with_context(|| format!("entry {name} missing"))?;
    let mut v = Vec::with_capacity(f.size().min(1 << 30) as usize);
    std::io::Read::read_to_end(&mut f, &mut v).with_context(|| format!("entry {name} is corrupt"))?;
    Ok(v)
}
