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
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    out: usize,
    rows: usize,
    inp: usize,
    x_rs: usize,
    y_rs: usize,
    t: DType,
    y_f32: bool,
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

    fn plan(&self, s: Shape, t: DType) -> Result<Plan> {
        let (tt, ty) = (cuda_type(t), if s.y_f32 { sys::cudaDataType::CUDA_R_32F } else { cuda_type(t) });
        unsafe {
            let desc =
                lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
                    .map_err(err)?;
            let trans: i32 = 1; // CUBLAS_OP_T
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans as *const _ as *const _,
                std::mem::size_of_val(&trans),
            )
            .map_err(err)?;
            // Column-major view: A = W as (in × out), B = x as (in × rows), C = y as (out × rows).
            let a = lt::create_matrix_layout(tt, s.inp as u64, s.out as u64, s.inp as i64).map_err(err)?;
            let b = lt::create_matrix_layout(tt, s.inp as u64, s.rows as u64, s.x_rs as i64).map_err(err)?;
            let c = lt::create_matrix_layout(ty, s.out as u64, s.rows as u64, s.y_rs as i64).map_err(err)?;
            let pref = lt::create_matmul_pref().map_err(err)?;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &self.workspace_size as *const _ as *const _,
                std::mem::size_of::<usize>(),
            )
            .map_err(err)?;
            let h = lt::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref);
            lt::destroy_matmul_pref(pref).ok();
            let h = h.map_err(|e| {
                anyhow!("cuBLASLt has no algorithm for a {}×{}×{} {t} product: {e:?}", s.out, s.rows, s.inp)
            })?;
            Ok(Plan { desc, a, b, c, algo: h.algo })
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
        let s = Shape { out, rows, inp, x_rs, y_rs, t, y_f32 };
        let mut plans = self.plans.lock().unwrap();
        if let std::collections::hash_map::Entry::Vacant(v) = plans.entry(s) {
            v.insert(self.plan(s, t)?);
        }
        let p = &plans[&s];
        let (alpha, beta) = (1.0f32, 0.0f32);
        unsafe {
            lt::matmul(
                self.handle,
                p.desc,
                &alpha as *const f32 as *const _,
                &beta as *const f32 as *const _,
                w as *const _,
                p.a,
                x as *const _,
                p.b,
                y as *const _,
                p.c,
                y as *mut _,
                p.c,
                &p.algo,
                self.workspace as *mut _,
                self.workspace_size,
                stream as sys::cudaStream_t,
            )
            .map_err(err)
        }
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
