//! Weight storage: row-major matrices kept in f32, bf16 or f16 and widened to f32 on the fly.

use crate::ops::q8::Q8;
use half::{bf16, f16};
use std::fmt;
use std::str::FromStr;

/// Element type of stored weights (activations and state are always f32 on the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// 8-bit weights in blocks with f32 scales (the CPU's large matrices; see `ops::q8`).
    I8,
}

impl DType {
    /// Bytes per element (an 8-bit block's scale not counted).
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I8 => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I8 => "int8",
        })
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
            "int8" | "i8" | "q8" => Ok(DType::I8),
            _ => Err(format!("unknown dtype '{s}' (expected f32, bf16, f16 or int8)")),
        }
    }
}

/// The values of one matrix in its storage type.
#[derive(Clone, Debug)]
pub enum Store {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I8(Q8),
}

/// Collects `it` into a vector whose memory the kernel is asked to back with transparent huge
/// pages before it is first touched. Decode streams every weight once per token; with 4 KiB
/// pages that is a TLB miss every 4 KiB, which measurably lowers the bandwidth reached.
pub fn weight_vec<T: Copy>(len: usize, it: impl Iterator<Item = T>) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = len * std::mem::size_of::<T>();
        let start = v.as_ptr() as usize;
        let first = start.next_multiple_of(HUGE);
        let last = (start + bytes) / HUGE * HUGE;
        if last > first {
            // Advisory only: failure (no THP support) leaves ordinary pages.
            unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_HUGEPAGE) };
        }
    }
    v.extend(it.take(len));
    v
}

impl Store {
    /// Rounds f32 values into storage of type `dtype` (round to nearest even).
    pub fn from_f32(v: Vec<f32>, dtype: DType) -> Store {
        let n = v.len();
        match dtype {
            DType::F32 => Store::F32(weight_vec(n, v.into_iter())),
            DType::BF16 => Store::BF16(weight_vec(n, v.iter().map(|&x| bf16::from_f32(x)))),
            DType::F16 => Store::F16(weight_vec(n, v.iter().map(|&x| f16::from_f32(x)))),
            DType::I8 => Store::I8(Q8::quantize(&v)),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Store::F32(_) => DType::F32,
            Store::BF16(_) => DType::BF16,
            Store::F16(_) => DType::F16,
            Store::I8(_) => DType::I8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Store::F32(v) => v.len(),
            Store::BF16(v) => v.len(),
            Store::F16(v) => v.len(),
            Store::I8(q) => q.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widens `self[start..start + out.len()]` into `out`.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Store::F32(v) => out.copy_from_slice(&v[start..end]),
            Store::BF16(v) => out.iter_mut().zip(&v[start..end]).for_each(|(o, x)| *o = x.to_f32()),
            Store::F16(v) => out.iter_mut().zip(&v[start..end]).for_each(|(o, x)| *o = x.to_f32()),
            Store::I8(q) => q.read_f32(start, out),
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.read_f32(0, &mut out);
        out
    }

    /// Little-endian bytes in the storage type (for writing checkpoints; an 8-bit store's
    /// values only, its scales are a tensor of their own).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Store::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Store::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            Store::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            Store::I8(q) => q.q.iter().map(|&x| x as u8).collect(),
        }
    }
}

/// A row-major `rows × cols` weight matrix (a Linear layer's weight is `out × in`).
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Store,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: Store) -> Matrix {
        assert_eq!(rows * cols, data.len(), "matrix data does not match its shape");
        Matrix { rows, cols, data }
    }

    /// Bytes of the stored values (with an 8-bit matrix's scales).
    pub fn bytes(&self) -> usize {
        match &self.data {
            Store::I8(q) => q.len() + 4 * q.d.len(),
            d => d.len() * d.dtype().size(),
        }
    }

    /// Widens row `r` into `out` (`out.len() == cols`).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        self.data.read_f32(r * self.cols, out)
    }
}
