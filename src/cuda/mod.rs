//! The CUDA backend (cargo feature `cuda`). Nothing here needs a CUDA toolkit to build: the
//! driver, NVRTC and cuBLASLt are loaded at run time, each checked before its first use so a
//! missing one is an error message, not a panic; the kernels are compiled by NVRTC for the
//! device in hand and cached on disk (see [`kernels`]).

pub mod bench;
pub mod consts;
pub mod gemm;
pub mod kernels;
pub mod model;
pub mod ops;
pub mod pick;
pub mod train;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
};
use gemm::Gemm;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// cuBLASLt's recommended workspace on Hopper.
const GEMM_WORKSPACE: usize = 32 << 20;

pub(crate) fn err(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("CUDA: {e:?}")
}

/// One GPU: a context, the stream all work goes to, the compiled kernels and a cuBLASLt handle.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub arch: String,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    funcs: Mutex<HashMap<String, CudaFunction>>,
    /// Dynamic shared memory each kernel has been allowed beyond the default.
    smem_allowed: Mutex<HashMap<String, u32>>,
    /// Programmatic dependent launch is there (compute capability 9.0 on).
    early_launch: bool,
    pub gemm: Gemm,
    _workspace: CudaSlice<u8>,
}

/// Freed buffers stay in the device's stream-ordered memory pool rather than going back to the
/// driver at each synchronisation (its default), so a buffer taken again (a cached state, the
/// next batch's activations) is not mapped afresh.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result().map_err(err)?;
        sys::cuMemPoolSetAttribute(pool, attr, &mut threshold as *mut u64 as *mut _).result().map_err(err)
    }
}

impl Gpu {
    /// Opens GPU `ordinal`, loading (compiling on first use) every kernel.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "no CUDA driver found (libcuda.so): this machine needs an NVIDIA GPU and its driver for --device cuda"
            );
        }
        if !kernels::nvrtc_present() {
            bail!("NVRTC (libnvrtc.so) was not found: install the CUDA runtime libraries (e.g. pip install nvidia-cuda-nvrtc) or add them to LD_LIBRARY_PATH");
        }
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            bail!("cuBLASLt (libcublasLt.so) was not found: install the CUDA libraries or add them to LD_LIBRARY_PATH");
        }
        let n = CudaContext::device_count().map_err(|e| anyhow!("the CUDA driver found no usable GPU ({e:?})"))?;
        if ordinal >= n as usize {
            bail!("cuda:{ordinal} does not exist: {n} GPU(s) found");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cannot open cuda:{ordinal}: {e:?}"))?;
        // Buffers are ordered by the one stream; per-buffer events would only add work (and
        // nodes in captured graphs).
        unsafe { ctx.disable_event_tracking() };
        if ctx.has_async_alloc() {
            keep_freed_memory(&ctx)?;
        }
        let stream = ctx.new_stream().map_err(err)?;
        let (major, minor) = ctx.compute_capability().map_err(err)?;
        let arch = kernels::arch_for(major, minor);
        let workspace = unsafe { stream.alloc::<u8>(GEMM_WORKSPACE) }.map_err(err)?;
        let gemm = Gemm::new(dptr(&workspace, &stream), GEMM_WORKSPACE)?;
        let name = ctx.name().map_err(err)?;
        let gpu = Gpu {
            ctx,
            stream,
            name,
            arch,
            modules: Mutex::default(),
            funcs: Mutex::default(),
            smem_allowed: Mutex::default(),
            early_launch: major >= 9,
            gemm,
            _workspace: workspace,
        };
        gpu.load_units(&kernels::base_units())?;
        Ok(gpu)
    }

    /// Compiles (or takes from the disk cache) and loads `units` not loaded yet.
    fn load_units(&self, units: &[kernels::Unit]) -> Result<()> {
        let mut modules = self.modules.lock().unwrap();
        let todo: Vec<kernels::Unit> = units.iter().filter(|u| !modules.contains_key(&u.name)).cloned().collect();
        for (u, bin) in todo.iter().zip(kernels::load(&todo, &self.arch)?) {
            let m = self
                .ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bin))
                .map_err(|e| anyhow!("cannot load kernel module {} on {}: {e:?}", u.name, self.arch))?;
            modules.insert(u.name.clone(), m);
        }
        Ok(())
    }

    fn func(&self, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.funcs.lock().unwrap().get(name) {
            return Ok(f.clone());
        }
        let unit = kernels::unit_for(name).ok_or_else(|| anyhow!("no kernel named {name}"))?;
        self.load_units(std::slice::from_ref(&unit))?;
        let f = self.modules.lock().unwrap()[&unit.name]
            .load_function(name)
            .map_err(|e| anyhow!("kernel {name} missing from module {}: {e:?}", unit.name))?;
        self.funcs.lock().unwrap().insert(name.into(), f.clone());
        Ok(f)
    }

    /// Launches kernel `name` with its parameter struct `p` (and any extra scalar `q`).
    pub fn launch<P: DeviceRepr>(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        p: &P,
        q: Option<&i32>,
    ) -> Result<()> {
        self.launch_smem(name, grid, block, 0, p, q)
    }

    /// [`Gpu::launch`] with `smem` bytes of dynamic shared memory.
    pub fn launch_smem<P: DeviceRepr>(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        p: &P,
        q: Option<&i32>,
    ) -> Result<()> {
        use cudarc::driver::{LaunchConfig, PushKernelArg};
        let f = self.kernel(name, smem)?;
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem };
        let mut b = self.stream.launch_builder(&f);
        b.arg(p);
        if let Some(q) = q {
            b.arg(q);
        }
        unsafe { b.launch(cfg) }.map_err(|e| anyhow!("launching {name}: {e:?}"))?;
        Ok(())
    }

    /// Kernel `name`, loaded (compiled on first use) and allowed `smem` bytes of dynamic shared
    /// memory (the attribute is set once, on the first request above the default 48 KiB).
    pub fn kernel(&self, name: &str, smem: u32) -> Result<CudaFunction> {
        let f = self.func(name)?;
        let mut allowed = self.smem_allowed.lock().unwrap();
        if smem > 48 << 10 && allowed.get(name).is_none_or(|&a| a < smem) {
            let a = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            f.set_attribute(a, smem as i32).map_err(|e| anyhow!("{name}: {smem} bytes of shared memory: {e:?}"))?;
            allowed.insert(name.into(), smem);
        }
        Ok(f)
    }

    /// Launches kernel `name` with `smem` bytes of dynamic shared memory, allowed to start while
    /// the kernel before it on the stream finishes (programmatic dependent launch, sm_90 on): its
    /// launch and the loads it issues before `wait_inputs()` (of the model's weights only)
    /// overlap that kernel's tail. Only for kernels that call `wait_inputs()` (common.cuh)
    /// before they read anything else or write anything.
    pub fn launch_early<P: DeviceRepr>(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        p: &P,
    ) -> Result<()> {
        if !self.early_launch {
            return self.launch_smem(name, grid, block, smem, p, None);
        }
        let f = self.kernel(name, smem)?;
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        self.launch_with(name, &f, grid, block, smem, p, attr)
    }

    /// The launch attribute that has the driver check that every block can be resident at
    /// once, as a kernel with grid barriers needs.
    pub fn cooperative() -> sys::CUlaunchAttribute {
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
        attr.value.cooperative = 1;
        attr
    }

    /// Launches kernel `f` (named `name`, one parameter struct) with launch attribute `attr`.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_with<P: DeviceRepr>(
        &self,
        name: &str,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        p: &P,
        mut attr: sys::CUlaunchAttribute,
    ) -> Result<()> {
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let mut args = [p as *const P as *mut std::ffi::c_void];
        self.ctx.bind_to_thread().map_err(err)?;
        unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| anyhow!("launching {name}: {e:?}"))
    }

    /// The work `f` enqueues on the stream, captured (not run) as a CUDA graph, uploaded.
    pub fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        let s = &self.stream;
        s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(err)?;
        let captured = f();
        let graph = s.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(err);
        captured?;
        let graph = graph?.ok_or_else(|| anyhow!("CUDA graph capture produced no graph"))?;
        graph.upload().map_err(err)?;
        Ok(graph)
    }

    pub fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        unsafe { self.stream.alloc::<T>(len.max(1)) }
            .map_err(|e| anyhow!("out of GPU memory? allocating {len} elements: {e:?}"))
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(err)
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>, len: usize) -> Result<Vec<T>> {
        self.download_at(dev, 0, len)
    }

    /// Elements `start..start + len` of `dev`.
    pub fn download_at<T: DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); len];
        self.stream.memcpy_dtoh(&dev.slice(start..start + len), &mut out).map_err(err)?;
        self.sync()?;
        Ok(out)
    }

    /// Copies `rows` rows of `width` bytes from `src` (rows `src_pitch` bytes apart) to `dst`
    /// (`dst_pitch` apart), device to device, in one strided copy on the stream.
    pub fn copy_rows(
        &self,
        dst: u64,
        dst_pitch: usize,
        src: u64,
        src_pitch: usize,
        width: usize,
        rows: usize,
    ) -> Result<()> {
        self.copy_2d(Side::Device(dst), dst_pitch, Side::Device(src), src_pitch, width, rows)
    }

    /// Zeroes `rows` rows of `width` f32 values at `dst`, rows `pitch` bytes apart (enqueued).
    pub fn zero_rows(&self, dst: u64, pitch: usize, width: usize, rows: usize) -> Result<()> {
        if width == 0 || rows == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(err)?;
        let stream = self.stream.cu_stream();
        if unsafe { sys::cuMemsetD2D32Async(dst, pitch, 0, width, rows, stream) }.result().is_ok() {
            return Ok(());
        }
        // As with the 2-D copies, a pitch the driver refuses: one row at a time.
        for r in 0..rows {
            unsafe { sys::cuMemsetD32Async(dst + (r * pitch) as u64, 0, width, stream) }.result().map_err(err)?;
        }
        Ok(())
    }

    /// Row `r` of the rows at `src` (`pitch` bytes apart) into `rows[r]`, straight into the
    /// caller's memory.
    pub fn download_rows(&self, src: u64, pitch: usize, rows: &mut [&mut [f32]]) -> Result<()> {
        for (r, row) in rows.iter_mut().enumerate() {
            let (host, w) = (Side::Host(row.as_mut_ptr().cast()), 4 * row.len());
            self.copy_2d(host, w, Side::Device(src + (r * pitch) as u64), pitch, w, 1)?;
        }
        self.sync()
    }

    /// `rows[r]` to row `r` at `dst`, rows `pitch` bytes apart.
    pub fn upload_rows(&self, dst: u64, pitch: usize, rows: &[&[f32]]) -> Result<()> {
        for (r, row) in rows.iter().enumerate() {
            let (host, w) = (Side::Host(row.as_ptr() as *mut std::ffi::c_void), 4 * row.len());
            self.copy_2d(Side::Device(dst + (r * pitch) as u64), pitch, host, w, w, 1)?;
        }
        // The copies read `rows` until the stream passes them.
        self.sync()
    }

    fn copy_2d(
        &self,
        dst: Side,
        dst_pitch: usize,
        src: Side,
        src_pitch: usize,
        width: usize,
        rows: usize,
    ) -> Result<()> {
        if width == 0 || rows == 0 {
            return Ok(());
        }
        use sys::CUmemorytype::{CU_MEMORYTYPE_DEVICE, CU_MEMORYTYPE_HOST};
        let null = std::ptr::null_mut();
        let (src_type, src_host, src_dev) = match src {
            Side::Device(p) => (CU_MEMORYTYPE_DEVICE, null as *const _, p),
            Side::Host(p) => (CU_MEMORYTYPE_HOST, p as *const _, 0),
        };
        let (dst_type, dst_host, dst_dev) = match dst {
            Side::Device(p) => (CU_MEMORYTYPE_DEVICE, null, p),
            Side::Host(p) => (CU_MEMORYTYPE_HOST, p, 0),
        };
        let c = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: src_type,
            srcHost: src_host,
            srcDevice: src_dev,
            srcArray: std::ptr::null_mut(),
            srcPitch: src_pitch,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: dst_type,
            dstHost: dst_host,
            dstDevice: dst_dev,
            dstArray: std::ptr::null_mut(),
            dstPitch: dst_pitch,
            WidthInBytes: width,
            Height: rows,
        };
        self.ctx.bind_to_thread().map_err(err)?;
        // The callers own both sides for the copy's lifetime (host sides: until the sync that
        // follows).
        if unsafe { sys::cuMemcpy2DAsync_v2(&c, self.stream.cu_stream()) }.result().is_ok() {
            return Ok(());
        }
        // The driver may refuse pitches it did not allocate; the unaligned copy takes any, but
        // runs outside the stream.
        self.sync()?;
        unsafe { sys::cuMemcpy2DUnaligned_v2(&c) }.result().map_err(err)
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("a GPU kernel failed: {e:?}"))
    }

    pub fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        dptr(s, &self.stream)
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> Result<u32> {
        let a = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
        Ok(self.ctx.attribute(a).map_err(err)? as u32)
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(err)
    }
}

/// One side of a strided copy.
enum Side {
    Device(u64),
    Host(*mut std::ffi::c_void),
}

fn dptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}
