//! Projections through cuBLASLt: `y (rows × out) = x (rows × in) · Wᵀ` with W row-major
//! `(out × in)`, inputs in the activation type, output in it or in f32 (logits), always f32
//! accumulation (no TF32: the f32 mode is the reference path). Each shape's descriptors and the
//! heuristic's algorithm are made once and reused, so a call costs one cublasLtMatmul, which is
//! also what a captured CUDA graph replays.

use crate::tensor::DType;
use anyhow::{anyhow, Result};
use cudarc::cublaslt::{result as lt, sys};
use std::collections::HashMap;
use std::sync::Mutex;

fn cuda_type(t: DType) -> sys::cudaDataType {
    match t {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::I8 => unreachable!("8-bit weights run on the CPU"),
    }
}

/// One operand of a row-major product: a matrix stored row-major at `ptr` with rows `ld`
/// elements apart, taken as stored or transposed (`t`).
#[derive(Clone, Copy)]
pub struct Operand {
    pub ptr: u64,
    pub ld: usize,
    pub t: bool,
}

impl Operand {
    pub fn n(ptr: u64, ld: usize) -> Operand {
        Operand { ptr, ld, t: false }
    }

    pub fn t(ptr: u64, ld: usize) -> Operand {
        Operand { ptr, ld, t: true }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    ta: bool,
    tb: bool,
    t: DType,
    c_f32: bool,
    /// Bytes each pointer (A, B, C) is aligned to, up to 16: the algorithm must allow it.
    align: [u32; 3],
}

fn alignment(p: u64) -> u32 {
    1 << p.trailing_zeros().min(4)
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    workspace_size: usize,
    plans: Mutex<HashMap<Shape, Plan>>,
}

// The handle and plans are used from one stream at a time; the Mutex guards the plan map.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

fn err(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("cuBLASLt: {e:?}")
}

impl Gemm {
    /// `workspace`: device memory of `workspace_size` bytes that outlives this object.
    pub fn new(workspace: u64, workspace_size: usize) -> Result<Gemm> {
        Ok(Gemm { handle: lt::create_handle().map_err(err)?, workspace, workspace_size, plans: Mutex::default() })
    }

    /// cuBLASLt is column-major: the row-major `C = op(A)·op(B)` is computed as the column-major
    /// `Cᵀ = op(B)ᵀ·op(A)ᵀ`, where a row-major matrix read column-major is its transpose.
    fn plan(&self, s: Shape) -> Result<Plan> {
        let (tt, ty) = (cuda_type(s.t), if s.c_f32 { sys::cudaDataType::CUDA_R_32F } else { cuda_type(s.t) });
        unsafe {
            let desc =
                lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
                    .map_err(err)?;
            for (attr, t) in [
                (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, s.tb),
                (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, s.ta),
            ] {
                let op: i32 = t as i32; // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
                lt::set_matmul_desc_attribute(desc, attr, &op as *const _ as *const _, std::mem::size_of_val(&op))
                    .map_err(err)?;
            }
            // Stored shapes, column-major: B as (n × k) or, transposed, (k × n); A likewise.
            let (br, bc) = if s.tb { (s.k, s.n) } else { (s.n, s.k) };
            let (ar, ac) = if s.ta { (s.m, s.k) } else { (s.k, s.m) };
            let a = lt::create_matrix_layout(tt, br as u64, bc as u64, s.ldb as i64).map_err(err)?;
            let b = lt::create_matrix_layout(tt, ar as u64, ac as u64, s.lda as i64).map_err(err)?;
            let c = lt::create_matrix_layout(ty, s.n as u64, s.m as u64, s.ldc as i64).map_err(err)?;
            let pref = lt::create_matmul_pref().map_err(err)?;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &self.workspace_size as *const _ as *const _,
                std::mem::size_of::<usize>(),
            )
            .map_err(err)?;
            // cuBLASLt's A is our B and its B our A (see above); C and D are our C.
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            for (attr, bytes) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, s.align[1]),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, s.align[0]),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, s.align[2]),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, s.align[2]),
            ] {
                lt::set_matmul_pref_attribute(pref, attr, &bytes as *const u32 as *const _, 4).map_err(err)?;
            }
            let h = lt::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref);
            lt::destroy_matmul_pref(pref).ok();
            let h = h.map_err(|e| {
                anyhow!("cuBLASLt has no algorithm for a {}×{}×{} {} product: {e:?}", s.m, s.n, s.k, s.t)
            })?;
            Ok(Plan { desc, a, b, c, algo: h.algo })
        }
    }

    /// Row-major `C (m × n, rows ldc apart) = op(A) (m × k) · op(B) (k × n)`, plus C when
    /// `accumulate`, on `stream`; A and B in `t`, C in f32 when `c_f32`, else in `t`; f32 sums.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        stream: cudarc::driver::sys::CUstream,
        t: DType,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: u64,
        ldc: usize,
        c_f32: bool,
        accumulate: bool,
    ) -> Result<()> {
        let align = [alignment(a.ptr), alignment(b.ptr), alignment(c)];
        let s = Shape { m, n, k, lda: a.ld, ldb: b.ld, ldc, ta: a.t, tb: b.t, t, c_f32, align };
        let mut plans = self.plans.lock().unwrap();
        if let std::collections::hash_map::Entry::Vacant(v) = plans.entry(s) {
            v.insert(self.plan(s)?);
        }
        let p = &plans[&s];
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        unsafe {
            lt::matmul(
                self.handle,
                p.desc,
                &alpha as *const f32 as *const _,
                &beta as *const f32 as *const _,
                b.ptr as *const _,
                p.a,
                a.ptr as *const _,
                p.b,
                c as *const _,
                p.c,
                c as *mut _,
                p.c,
                &p.algo,
                self.workspace as *mut _,
                self.workspace_size,
                stream as sys::cudaStream_t,
            )
            .map_err(err)
        }
    }

    /// `y[r·y_rs + o] = Σ_i x[r·x_rs + i] · w[o·inp + i]` for `rows` rows, on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        stream: cudarc::driver::sys::CUstream,
        t: DType,
        w: u64,
        out: usize,
        inp: usize,
        x: u64,
        x_rs: usize,
        rows: usize,
        y: u64,
        y_rs: usize,
        y_f32: bool,
    ) -> Result<()> {
        self.gemm(stream, t, (rows, out, inp), Operand::n(x, x_rs), Operand::t(w, inp), y, y_rs, y_f32, false)
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        unsafe {
            for (_, p) in self.plans.lock().unwrap().drain() {
                lt::destroy_matmul_desc(p.desc).ok();
                lt::destroy_matrix_layout(p.a).ok();
                lt::destroy_matrix_layout(p.b).ok();
                lt::destroy_matrix_layout(p.c).ok();
            }
            lt::destroy_handle(self.handle).ok();
        }
    }
}
