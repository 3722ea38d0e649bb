//! The quantization algorithms on device buffers: Hessian accumulation with
//! cuBLAS, RTN/INT8/FP8 quantize kernels, GPTQ (cuSOLVER's f64 Cholesky
//! inverse, a warp-per-row block kernel and cuBLAS for the lazy trailing
//! update) and dequantization. Inputs stay on the device so the GPU pipeline
//! never copies activations or weights back between layers; what comes back
//! to the host is what the checkpoint writer stores.

use cudarc::cublas::{Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::cusolver::sys as solver_sys;
use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::Gpu;
use super::error::{DriverContext, GpuError};
use super::staging::Downloads;
use crate::format::pack;
use crate::quant::{
    ActOrder, Codes, FloatDtype, Hessian, IntScheme, Matrix, PackedCodes, QuantError,
    QuantizedLinear, WeightScheme, grid,
};

/// Threads per block of the warp-per-item kernels: four warps.
const WARP_BLOCK: u32 = 128;
/// Threads per block of the element-wise kernels.
const ELEMENT_BLOCK: u32 = 256;
/// GPTQ's lazy-update block; the kernel's register layout assumes it.
pub const GPTQ_BLOCK: usize = 128;

/// Launch shape for one warp per item.
fn per_warp(items: usize) -> LaunchConfig {
    let threads = items as u64 * 32;
    LaunchConfig {
        grid_dim: (threads.div_ceil(u64::from(WARP_BLOCK)) as u32, 1, 1),
        block_dim: (WARP_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Items at least this long get a whole block as their team.
const LONG_ITEM: usize = 1024;
/// Threads of a block-wide team.
const TEAM_BLOCK: u32 = 256;

/// Launch shape and team size for items of `len` values each: a warp per
/// item for short ones, a block per item for long ones.
pub(crate) fn per_team(items: usize, len: usize) -> (LaunchConfig, i32) {
    if len < LONG_ITEM {
        return (per_warp(items), 32);
    }
    let cfg = LaunchConfig {
        grid_dim: (items as u32, 1, 1),
        block_dim: (TEAM_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    (cfg, TEAM_BLOCK as i32)
}

/// Items from this long use the register-cached build of the RTN and FP8
/// kernels (`*_long`, which read each weight once). On the H100 it took
/// per-channel rows of 14336 from 62 % to 74–89 % of the copy bandwidth,
/// but cost rows of 4096 a quarter of theirs (fewer warps in flight).
const CACHED_ITEM: usize = 8192;
/// The longest item the cached build holds: `LONG_ITEM_CACHE` (quant.cu)
/// float4s per thread of a block-wide team.
const CACHED_ITEM_MAX: usize = 16 * 4 * TEAM_BLOCK as usize;

/// Whether items of `len` weights go to the register-cached kernel build.
fn register_cached(len: usize) -> bool {
    (CACHED_ITEM..=CACHED_ITEM_MAX).contains(&len)
}

/// Launch shape for one thread per element.
pub(crate) fn per_element(items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            (items as u64).div_ceil(u64::from(ELEMENT_BLOCK)) as u32,
            1,
            1,
        ),
        block_dim: (ELEMENT_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn dtype_code(d: FloatDtype) -> i32 {
    match d {
        FloatDtype::F16 => 0,
        FloatDtype::Bf16 => 1,
        FloatDtype::F32 => 2,
    }
}

fn shape_error(what: String, expected: String, got: String) -> GpuError {
    GpuError::Quant(QuantError::Shape {
        what,
        expected,
        got,
    })
}

/// A layer's `Σ xᵀx` kept on the device while its calibration batches stream
/// through; the f32 running sum is promoted to f64 once, when GPTQ starts.
pub struct DeviceHessian {
    layer: String,
    dim: usize,
    sum: CudaSlice<f32>,
    samples: usize,
}

impl DeviceHessian {
    /// An empty accumulator for a Linear with `dim` inputs.
    pub fn new(gpu: &Gpu, layer: impl Into<String>, dim: usize) -> Result<Self, GpuError> {
        let sum = gpu
            .stream()
            .alloc_zeros::<f32>(dim * dim)
            .during("allocating a Hessian")?;
        Ok(Self {
            layer: layer.into(),
            dim,
            sum,
            samples: 0,
        })
    }

    /// Input width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows seen so far.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Adds `xᵀx` of `rows` activation rows `x: [rows, dim]` (row-major).
    pub fn add_batch<X: DevicePtr<f32>>(
        &mut self,
        gpu: &Gpu,
        x: &X,
        rows: usize,
    ) -> Result<(), GpuError> {
        if rows == 0 {
            return Ok(());
        }
        if x.len() < rows * self.dim {
            return Err(shape_error(
                format!("{} calibration activations", self.layer),
                format!("[{rows}, {}]", self.dim),
                format!("{} values", x.len()),
            ));
        }
        let d = self.dim as i32;
        // Row-major x [rows, d] is column-major xᵀ [d, rows]; H = xᵀ · x.
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_T,
            m: d,
            n: d,
            k: rows as i32,
            alpha: 1.0f32,
            lda: d,
            ldb: d,
            beta: 1.0f32,
            ldc: d,
        };
        // SAFETY: x holds rows·d values (checked above), sum d·d.
        unsafe { gpu.blas()?.gemm(cfg, x, x, &mut self.sum) }
            .during(format!("accumulating the Hessian of {}", self.layer))?;
        self.samples += rows;
        Ok(())
    }

    /// The running sum `Σ xᵀx`, `[dim, dim]` row-major, on the host.
    pub fn download(&self, gpu: &Gpu) -> Result<Vec<f32>, GpuError> {
        gpu.stream()
            .clone_dtoh(&self.sum)
            .during("downloading the Hessian")
    }

    /// Uploads a CPU accumulator's finalized `H` (for the trait backend).
    fn finalized_from_host(gpu: &Gpu, h: &Hessian) -> Result<CudaSlice<f64>, GpuError> {
        let full = h.finalize()?;
        gpu.stream()
            .clone_htod(&full)
            .during("uploading the Hessian")
    }
}

/// A quantized Linear: what the writer stores and the dequantized weight on
/// the device, which the GPU pipeline puts back into the layer. The
/// linear's host copy of the dequantized weight is empty (0 × 0) when the
/// quantizer keeps weights on the device (see
/// [`DeviceQuantizer::keeping_weights_on_device`]).
pub struct DeviceQuantized {
    pub linear: QuantizedLinear,
    pub dequantized: CudaSlice<f32>,
}

/// The loaded kernels; one per algorithm step.
pub struct DeviceQuantizer<'g> {
    gpu: &'g Gpu,
    /// Whether results carry a host copy of the dequantized weight.
    host_weights: bool,
    rtn_int: CudaFunction,
    rtn_int_long: CudaFunction,
    fp8_rows: CudaFunction,
    fp8_rows_long: CudaFunction,
    pack_words: CudaFunction,
    dequantize_int: CudaFunction,
    dequantize_fp8: CudaFunction,
    hessian_finalize: CudaFunction,
    dead_columns: CudaFunction,
    permute_damp: CudaFunction,
    permute_columns: CudaFunction,
    symmetrize_lower: CudaFunction,
    upper_to_row_major: CudaFunction,
    gptq_block: CudaFunction,
    unpermute_codes: CudaFunction,
    diagonal: CudaFunction,
    /// The page-locked buffer codes come back through.
    downloads: Downloads,
}

/// The two cuSOLVER steps GPTQ's inverse needs.
#[derive(Clone, Copy)]
enum Factorisation {
    /// `potrf`: the Cholesky factor.
    Cholesky,
    /// `potri`: the inverse from a Cholesky factor.
    InverseFromCholesky,
}

/// Grid parameters on the device, `[rows, groups]`.
struct DeviceGrid {
    scales: CudaSlice<f32>,
    zeros: CudaSlice<i32>,
}

impl DeviceGrid {
    /// Room for the `[rows, cols / group_size]` grids of a weight, for
    /// `rtn_int` to fill.
    fn for_kernel(
        gpu: &Gpu,
        [rows, cols]: [usize; 2],
        group_size: usize,
    ) -> Result<Self, GpuError> {
        let items = rows * (cols / group_size);
        Ok(Self {
            scales: gpu.buffer_to_fill(items, "scales")?,
            zeros: gpu.buffer_to_fill(items, "zero points")?,
        })
    }
}

impl<'g> DeviceQuantizer<'g> {
    /// Loads the kernels from the GPU's compiled module.
    pub fn new(gpu: &'g Gpu) -> Result<Self, GpuError> {
        Ok(Self {
            gpu,
            host_weights: true,
            rtn_int: gpu.quant_fn("rtn_int")?,
            rtn_int_long: gpu.quant_fn("rtn_int_long")?,
            fp8_rows: gpu.quant_fn("fp8_rows")?,
            fp8_rows_long: gpu.quant_fn("fp8_rows_long")?,
            pack_words: gpu.quant_fn("pack_words")?,
            dequantize_int: gpu.quant_fn("dequantize_int")?,
            dequantize_fp8: gpu.quant_fn("dequantize_fp8")?,
            hessian_finalize: gpu.quant_fn("hessian_finalize")?,
            dead_columns: gpu.quant_fn("gptq_dead_columns")?,
            permute_damp: gpu.quant_fn("gptq_permute_damp")?,
            permute_columns: gpu.quant_fn("permute_columns")?,
            symmetrize_lower: gpu.quant_fn("symmetrize_lower")?,
            upper_to_row_major: gpu.quant_fn("upper_to_row_major")?,
            gptq_block: gpu.quant_fn("gptq_block")?,
            unpermute_codes: gpu.quant_fn("unpermute_codes")?,
            diagonal: gpu.quant_fn("diagonal")?,
            downloads: Downloads::default(),
        })
    }

    /// Results without the host copy of the dequantized weight: the writer
    /// does not need it, and for a large model it is gigabytes of transfers.
    pub fn keeping_weights_on_device(mut self) -> Self {
        self.host_weights = false;
        self
    }

    /// The dequantized weight on the host, or an empty matrix when it stays
    /// on the device.
    fn host_weight(
        &self,
        deq: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<Matrix, GpuError> {
        if !self.host_weights {
            return Ok(Matrix::zeros(0, 0));
        }
        let data = self
            .gpu
            .stream()
            .clone_dtoh(deq)
            .during("downloading weights")?;
        Ok(Matrix::new(rows, cols, data)?)
    }

    /// The GPU these kernels run on.
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// Grid parameters (and, with `codes`, codes and dequantized values) of
    /// each `(row, group)` by min-max round-to-nearest.
    fn rtn_launch(
        &self,
        w: &CudaSlice<f32>,
        shape: [usize; 2],
        group_size: usize,
        scheme: &IntScheme,
        grid: &mut DeviceGrid,
        out: Option<(&mut CudaSlice<i8>, &mut CudaSlice<f32>)>,
    ) -> Result<(), GpuError> {
        let [rows, cols] = shape;
        let groups = cols / group_size;
        let stream = self.gpu.stream();
        let (rows_i, cols_i, gs) = (rows as i32, cols as i32, group_size as i32);
        let (bits, sym) = (i32::from(scheme.bits), i32::from(scheme.symmetric));
        let dtype = dtype_code(scheme.scale_dtype);
        let eps = scheme.scale_dtype.eps();
        let null = 0u64;
        let (cfg, team) = per_team(rows * groups, group_size);
        let kernel = if register_cached(group_size) {
            &self.rtn_int_long
        } else {
            &self.rtn_int
        };
        let mut launch = stream.launch_builder(kernel);
        launch
            .arg(w)
            .arg(&rows_i)
            .arg(&cols_i)
            .arg(&gs)
            .arg(&bits)
            .arg(&sym);
        launch.arg(&dtype).arg(&eps).arg(&team);
        match out {
            Some((codes, deq)) => {
                launch.arg(codes).arg(deq);
            }
            None => {
                launch.arg(&null).arg(&null);
            }
        }
        launch.arg(&mut grid.scales).arg(&mut grid.zeros);
        // SAFETY: w holds rows·cols values; codes/deq (when given) as many;
        // scales/zeros rows·groups; one team per (row, group).
        unsafe { launch.launch(cfg) }.during("launching rtn_int")?;
        Ok(())
    }

    /// `rtn_int`'s grids (and, with `out`, codes and weights) in new buffers.
    fn rtn_grid(
        &self,
        w: &CudaSlice<f32>,
        shape: [usize; 2],
        group_size: usize,
        scheme: &IntScheme,
        out: Option<(&mut CudaSlice<i8>, &mut CudaSlice<f32>)>,
    ) -> Result<DeviceGrid, GpuError> {
        let mut grid = DeviceGrid::for_kernel(self.gpu, shape, group_size)?;
        self.rtn_launch(w, shape, group_size, scheme, &mut grid, out)?;
        Ok(grid)
    }

    /// Round-to-nearest of a device weight `[rows, cols]` (also INT8).
    pub fn rtn(
        &self,
        layer: &str,
        w: &CudaSlice<f32>,
        shape: [usize; 2],
        scheme: IntScheme,
    ) -> Result<DeviceQuantized, GpuError> {
        check_len(layer, w, shape)?;
        let group_size = grid::validate(&scheme, layer, shape[1])?;
        let n = shape[0] * shape[1];
        let mut codes = self.gpu.buffer_to_fill(n, "codes")?;
        let mut deq = self.gpu.buffer_to_fill(n, "the dequantized weight")?;
        let grid = self.rtn_grid(w, shape, group_size, &scheme, Some((&mut codes, &mut deq)))?;
        self.finish_int(shape, scheme, ActOrder::None, &codes, grid, None, deq)
    }

    /// FP8 E4M3 with one scale per output channel.
    pub fn fp8(
        &self,
        layer: &str,
        w: &CudaSlice<f32>,
        shape: [usize; 2],
        scale_dtype: FloatDtype,
    ) -> Result<DeviceQuantized, GpuError> {
        check_len(layer, w, shape)?;
        let [rows, cols] = shape;
        if rows == 0 || cols == 0 {
            return Err(shape_error(
                format!("{layer} weight"),
                "a non-empty [out, in] matrix".to_string(),
                format!("[{rows}, {cols}]"),
            ));
        }
        let stream = self.gpu.stream();
        let mut codes = self.gpu.buffer_to_fill(rows * cols, "codes")?;
        let mut deq = self
            .gpu
            .buffer_to_fill(rows * cols, "the dequantized weight")?;
        let mut scales = self.gpu.buffer_to_fill(rows, "scales")?;
        self.fp8_launch(w, shape, scale_dtype, &mut codes, &mut deq, &mut scales)?;
        let linear = QuantizedLinear {
            shape,
            scheme: WeightScheme::Fp8 { scale_dtype },
            act_order: ActOrder::None,
            codes: Codes::Fp8(self.download_bytes(&codes, |b| b)?),
            scales: Matrix::new(
                rows,
                1,
                stream.clone_dtoh(&scales).during("downloading scales")?,
            )?,
            zero_points: None,
            g_idx: None,
            dequantized: self.host_weight(&deq, rows, cols)?,
        };
        Ok(DeviceQuantized {
            linear,
            dequantized: deq,
        })
    }

    fn fp8_launch(
        &self,
        w: &CudaSlice<f32>,
        [rows, cols]: [usize; 2],
        scale_dtype: FloatDtype,
        codes: &mut CudaSlice<u8>,
        deq: &mut CudaSlice<f32>,
        scales: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let (rows_i, cols_i) = (rows as i32, cols as i32);
        let dtype = dtype_code(scale_dtype);
        let eps = scale_dtype.eps();
        let (cfg, team) = per_team(rows, cols);
        let kernel = if register_cached(cols) {
            &self.fp8_rows_long
        } else {
            &self.fp8_rows
        };
        let mut launch = self.gpu.stream().launch_builder(kernel);
        launch
            .arg(w)
            .arg(&rows_i)
            .arg(&cols_i)
            .arg(&dtype)
            .arg(&eps)
            .arg(&team);
        launch.arg(codes).arg(deq).arg(scales);
        // SAFETY: w, codes and deq hold rows·cols values, scales rows; one team per row.
        unsafe { launch.launch(cfg) }.during("launching fp8_rows")?;
        Ok(())
    }

    /// Seconds per launch of the RTN (`Some`) or FP8 (`None`) kernel alone
    /// on a device weight, outputs preallocated: `reps` launches back to back
    /// between two synchronizations (after one warm-up), so neither the
    /// launch latency nor the host's timer resolution enters the figure that
    /// is compared with the copy bandwidth.
    pub fn time_weight_only(
        &self,
        w: &CudaSlice<f32>,
        shape: [usize; 2],
        scheme: Option<IntScheme>,
        reps: usize,
    ) -> Result<f64, GpuError> {
        let stream = self.gpu.stream();
        let n = shape[0] * shape[1];
        let reps = reps.max(1);
        let mut deq = stream
            .alloc_zeros::<f32>(n)
            .during("allocating the dequantized weight")?;
        let started;
        match scheme {
            Some(s) => {
                let group_size = grid::validate(&s, "timing", shape[1])?;
                let mut codes = stream.alloc_zeros::<i8>(n).during("allocating codes")?;
                let mut grid = DeviceGrid::for_kernel(self.gpu, shape, group_size)?;
                let mut run = || {
                    let out = Some((&mut codes, &mut deq));
                    self.rtn_launch(w, shape, group_size, &s, &mut grid, out)
                };
                run()?;
                self.gpu.synchronize()?;
                started = std::time::Instant::now();
                for _ in 0..reps {
                    run()?;
                }
            }
            None => {
                let mut codes = stream.alloc_zeros::<u8>(n).during("allocating codes")?;
                let mut scales = stream
                    .alloc_zeros::<f32>(shape[0])
                    .during("allocating scales")?;
                self.fp8_launch(w, shape, FloatDtype::F16, &mut codes, &mut deq, &mut scales)?;
                self.gpu.synchronize()?;
                started = std::time::Instant::now();
                for _ in 0..reps {
                    self.fp8_launch(w, shape, FloatDtype::F16, &mut codes, &mut deq, &mut scales)?;
                }
            }
        }
        self.gpu.synchronize()?;
        Ok(started.elapsed().as_secs_f64() / reps as f64)
    }

    /// Integer codes on the host as the writer stores them: packed on the
    /// device when the artifact packs them (a 4-bit code then crosses PCIe
    /// and waits in host memory as half a byte), one byte each otherwise.
    fn download_codes(
        &self,
        codes: &CudaSlice<i8>,
        [rows, cols]: [usize; 2],
        bits: u8,
    ) -> Result<Codes, GpuError> {
        if !pack::packs(bits) {
            return Ok(Codes::Int(self.download_bytes(codes, |b| b as i8)?));
        }
        let n = rows * cols.div_ceil(pack::pack_factor(bits));
        let mut words = self.gpu.buffer_to_fill::<u32>(n, "packed codes")?;
        let (rows_l, cols_i, bits_i) = (rows as i64, cols as i32, i32::from(bits));
        let mut launch = self.gpu.stream().launch_builder(&self.pack_words);
        launch
            .arg(codes)
            .arg(&rows_l)
            .arg(&cols_i)
            .arg(&bits_i)
            .arg(&mut words);
        // SAFETY: codes holds rows·cols values, words rows·ceil(cols / (32 / bits)).
        unsafe { launch.launch(per_element(n)) }.during("launching pack_words")?;
        Ok(Codes::Packed(PackedCodes {
            bits,
            words: self.download_bytes(&words, |b| b)?,
        }))
    }

    /// A device buffer's bytes on the host, through the page-locked buffer.
    fn download_bytes<T, U>(
        &self,
        src: &CudaSlice<T>,
        convert: impl Fn(u8) -> U + Sync,
    ) -> Result<Vec<U>, GpuError>
    where
        U: Default + Clone + Send,
    {
        let len = src.len() * std::mem::size_of::<T>();
        // SAFETY: read as bytes only; every bit pattern is a valid u8.
        let Some(bytes) = (unsafe { src.transmute::<u8>(len) }) else {
            return Err(shape_error(
                "a download".to_string(),
                format!("{len} bytes"),
                "a shorter device buffer".to_string(),
            ));
        };
        self.downloads.bytes(self.gpu, &bytes, convert)
    }

    /// Downloads an integer result and assembles the [`QuantizedLinear`].
    #[allow(clippy::too_many_arguments)]
    fn finish_int(
        &self,
        shape: [usize; 2],
        scheme: IntScheme,
        act_order: ActOrder,
        codes: &CudaSlice<i8>,
        grid: DeviceGrid,
        g_idx: Option<Vec<i32>>,
        deq: CudaSlice<f32>,
    ) -> Result<DeviceQuantized, GpuError> {
        let [rows, cols] = shape;
        let stream = self.gpu.stream();
        let scales = stream
            .clone_dtoh(&grid.scales)
            .during("downloading scales")?;
        let groups = scales.len() / rows.max(1);
        let zero_points = if scheme.symmetric {
            None
        } else {
            let z = stream
                .clone_dtoh(&grid.zeros)
                .during("downloading zero points")?;
            Some(z.into_iter().map(|z| z as i8).collect())
        };
        let linear = QuantizedLinear {
            shape,
            scheme: WeightScheme::Int(scheme),
            act_order,
            codes: self.download_codes(codes, shape, scheme.bits)?,
            scales: Matrix::new(rows, groups, scales)?,
            zero_points,
            g_idx,
            dequantized: self.host_weight(&deq, rows, cols)?,
        };
        Ok(DeviceQuantized {
            linear,
            dequantized: deq,
        })
    }

    /// `2/n · Σ xᵀx` in f64 on the device.
    pub fn finalize_hessian(&self, h: &DeviceHessian) -> Result<CudaSlice<f64>, GpuError> {
        if h.samples == 0 {
            return Err(GpuError::Quant(QuantError::NoSamples {
                layer: h.layer.clone(),
            }));
        }
        let stream = self.gpu.stream();
        let count = (h.dim * h.dim) as i64;
        let mut out = stream
            .alloc_zeros::<f64>(h.dim * h.dim)
            .during("allocating the f64 Hessian")?;
        let factor = 2.0f64 / h.samples as f64;
        let mut launch = stream.launch_builder(&self.hessian_finalize);
        launch.arg(&h.sum).arg(&count).arg(&factor).arg(&mut out);
        // SAFETY: sum and out hold dim² values.
        unsafe { launch.launch(per_element(h.dim * h.dim)) }
            .during("launching hessian_finalize")?;
        Ok(out)
    }

    /// GPTQ with a host [`Hessian`] (the trait backend's entry).
    #[allow(clippy::too_many_arguments)]
    pub fn gptq_host_hessian(
        &self,
        layer: &str,
        w: &CudaSlice<f32>,
        shape: [usize; 2],
        hessian: &Hessian,
        scheme: IntScheme,
        act_order: ActOrder,
        damp_percent: f64,
    ) -> Result<DeviceQuantized, GpuError> {
        if hessian.dim() != shape[1] {
            return Err(shape_error(
                format!("{layer} Hessian"),
                format!("[{0}, {0}]", shape[1]),
                format!("[{0}, {0}]", hessian.dim()),
            ));
        }
        let h = DeviceHessian::finalized_from_host(self.gpu, hessian)?;
        self.gptq(layer, w, shape, h, scheme, act_order, damp_percent)
    }

    /// GPTQ of a device weight with its finalized f64 Hessian (consumed: it
    /// is overwritten in place). Same algorithm and order as the CPU twin.
    #[allow(clippy::too_many_arguments)]
    pub fn gptq(
        &self,
        layer: &str,
        w: &CudaSlice<f32>,
        shape: [usize; 2],
        mut h: CudaSlice<f64>,
        scheme: IntScheme,
        act_order: ActOrder,
        damp_percent: f64,
    ) -> Result<DeviceQuantized, GpuError> {
        check_len(layer, w, shape)?;
        let [rows, n] = shape;
        let group_size = grid::validate(&scheme, layer, n)?;
        let groups = n / group_size;
        if h.len() != n * n {
            return Err(shape_error(
                format!("{layer} Hessian"),
                format!("[{n}, {n}]"),
                format!("{} values", h.len()),
            ));
        }
        if !(damp_percent.is_finite() && damp_percent >= 0.0) {
            return Err(GpuError::Quant(QuantError::Unsupported {
                layer: layer.to_string(),
                field: "damp_percent",
                value: damp_percent.to_string(),
                expected: "a finite fraction >= 0",
            }));
        }
        let stream = self.gpu.stream();
        let (rows_i, n_i) = (rows as i32, n as i32);
        let mut w = stream.clone_dtod(w).during("copying the weight")?;

        // Dead inputs.
        let mut launch = stream.launch_builder(&self.dead_columns);
        launch.arg(&mut h).arg(&mut w).arg(&rows_i).arg(&n_i);
        // SAFETY: h holds n², w rows·n values; one thread per column.
        unsafe { launch.launch(per_element(n)) }.during("launching gptq_dead_columns")?;

        // Order and damping from the diagonal.
        let diag = self.diagonal_of(&h, n)?;
        let mut perm: Vec<i32> = (0..n as i32).collect();
        if act_order != ActOrder::None {
            perm.sort_by(|&a, &b| diag[b as usize].total_cmp(&diag[a as usize]));
        }
        let damp = damp_percent * diag.iter().sum::<f64>() / n as f64;
        let perm_dev = stream
            .clone_htod(&perm)
            .during("uploading the column order")?;
        let mut hp = stream
            .alloc_zeros::<f64>(n * n)
            .during("allocating the permuted Hessian")?;
        let mut launch = stream.launch_builder(&self.permute_damp);
        launch
            .arg(&h)
            .arg(&perm_dev)
            .arg(&n_i)
            .arg(&damp)
            .arg(&mut hp);
        // SAFETY: h and hp hold n² values, perm n.
        unsafe { launch.launch(per_element(n * n)) }.during("launching gptq_permute_damp")?;
        drop(h);
        let u = self.inverse_cholesky_upper(layer, hp, n)?;

        // Static order: grid parameters from the (dead-zeroed) original weight.
        let static_grid = if act_order == ActOrder::Static {
            Some(self.rtn_grid(&w, shape, group_size, &scheme, None)?)
        } else {
            None
        };
        let mut wp = stream
            .alloc_zeros::<f32>(rows * n)
            .during("allocating the permuted weight")?;
        let rows_l = rows as i64;
        let mut launch = stream.launch_builder(&self.permute_columns);
        launch
            .arg(&w)
            .arg(&perm_dev)
            .arg(&rows_l)
            .arg(&n_i)
            .arg(&mut wp);
        // SAFETY: w and wp hold rows·n values, perm n.
        unsafe { launch.launch(per_element(rows * n)) }.during("launching permute_columns")?;
        drop(w);

        let mut grid = DeviceGrid {
            scales: stream
                .alloc_zeros::<f32>(rows * groups)
                .during("allocating scales")?,
            zeros: stream
                .alloc_zeros::<i32>(rows * groups)
                .during("allocating zero points")?,
        };
        let mut qperm = stream
            .alloc_zeros::<i32>(rows * n)
            .during("allocating codes")?;
        let mut err = stream
            .alloc_zeros::<f32>(rows * GPTQ_BLOCK)
            .during("allocating block errors")?;
        let order_code: i32 = match act_order {
            ActOrder::None => 0,
            ActOrder::Static => 1,
            ActOrder::Group => 2,
        };
        let (gs, bits, sym) = (
            group_size as i32,
            i32::from(scheme.bits),
            i32::from(scheme.symmetric),
        );
        let dtype = dtype_code(scheme.scale_dtype);
        let eps = scheme.scale_dtype.eps();
        let null = 0u64;
        for i1 in (0..n).step_by(GPTQ_BLOCK) {
            let i2 = (i1 + GPTQ_BLOCK).min(n);
            let (i1_i, i2_i) = (i1 as i32, i2 as i32);
            let mut launch = stream.launch_builder(&self.gptq_block);
            launch
                .arg(&mut wp)
                .arg(&rows_i)
                .arg(&n_i)
                .arg(&i1_i)
                .arg(&i2_i);
            launch
                .arg(&u)
                .arg(&perm_dev)
                .arg(&order_code)
                .arg(&gs)
                .arg(&bits)
                .arg(&sym);
            launch.arg(&dtype).arg(&eps);
            match &static_grid {
                Some(s) => {
                    launch.arg(&s.scales).arg(&s.zeros);
                }
                None => {
                    launch.arg(&null).arg(&null);
                }
            }
            launch
                .arg(&mut grid.scales)
                .arg(&mut grid.zeros)
                .arg(&mut qperm)
                .arg(&mut err);
            // SAFETY: wp and qperm hold rows·n, u n², perm n, grids rows·groups,
            // err rows·GPTQ_BLOCK values; one warp per row.
            unsafe { launch.launch(per_warp(rows)) }.during("launching gptq_block")?;
            if i2 < n {
                self.trailing_update(&mut wp, &u, &err, rows, n, i1, i2)?;
            }
        }
        drop(wp);
        let grid = static_grid.unwrap_or(grid);

        let mut codes = stream
            .alloc_zeros::<i8>(rows * n)
            .during("allocating codes")?;
        let mut launch = stream.launch_builder(&self.unpermute_codes);
        launch
            .arg(&qperm)
            .arg(&perm_dev)
            .arg(&rows_l)
            .arg(&n_i)
            .arg(&mut codes);
        // SAFETY: qperm and codes hold rows·n values, perm n.
        unsafe { launch.launch(per_element(rows * n)) }.during("launching unpermute_codes")?;

        let g_idx = (act_order == ActOrder::Group && scheme.group_size.is_some()).then(|| {
            let mut idx = vec![0i32; n];
            for (k, &c) in perm.iter().enumerate() {
                idx[c as usize] = (k / group_size) as i32;
            }
            idx
        });
        let deq = self.dequantize_int_device(
            &codes,
            shape,
            groups,
            &grid,
            scheme.symmetric,
            g_idx.as_deref(),
        )?;
        self.finish_int(shape, scheme, act_order, &codes, grid, g_idx, deq)
    }

    /// `W[:, i2:] -= Err[:, :bs] · U[i1:i2, i2:]` (row-major) with cuBLAS.
    #[allow(clippy::too_many_arguments)]
    fn trailing_update(
        &self,
        wp: &mut CudaSlice<f32>,
        u: &CudaSlice<f32>,
        err: &CudaSlice<f32>,
        rows: usize,
        n: usize,
        i1: usize,
        i2: usize,
    ) -> Result<(), GpuError> {
        let bs = i2 - i1;
        let rest = n - i2;
        // Column-major view: C (rest × rows, ld n) = B (rest × bs, ld n) · A (bs × rows, ld BLOCK).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: rest as i32,
            n: rows as i32,
            k: bs as i32,
            alpha: -1.0f32,
            lda: n as i32,
            ldb: GPTQ_BLOCK as i32,
            beta: 1.0f32,
            ldc: n as i32,
        };
        let b = u.slice(i1 * n + i2..);
        let mut c = wp.slice_mut(i2..);
        // SAFETY: the views start inside their buffers and the leading
        // dimensions keep every access within rows·n (wp) and n² (u).
        unsafe { self.gpu.blas()?.gemm(cfg, &b, err, &mut c) }.during("GPTQ's trailing update")
    }

    /// The diagonal of an `n × n` f64 matrix, on the host.
    fn diagonal_of(&self, a: &CudaSlice<f64>, n: usize) -> Result<Vec<f64>, GpuError> {
        let stream = self.gpu.stream();
        let mut d = stream
            .alloc_zeros::<f64>(n)
            .during("allocating the diagonal")?;
        let n_i = n as i32;
        let mut launch = stream.launch_builder(&self.diagonal);
        launch.arg(a).arg(&n_i).arg(&mut d);
        // SAFETY: a holds n², d n values.
        unsafe { launch.launch(per_element(n)) }.during("launching diagonal")?;
        stream.clone_dtoh(&d).during("downloading the diagonal")
    }

    /// `U` with `H⁻¹ = UᵀU` (upper), f64 factorisations by cuSOLVER,
    /// returned row-major in f32 as the block kernel reads it.
    fn inverse_cholesky_upper(
        &self,
        layer: &str,
        mut a: CudaSlice<f64>,
        n: usize,
    ) -> Result<CudaSlice<f32>, GpuError> {
        use solver_sys::cublasFillMode_t::{CUBLAS_FILL_MODE_LOWER, CUBLAS_FILL_MODE_UPPER};
        let stream = self.gpu.stream();
        self.potrf(layer, &mut a, n, CUBLAS_FILL_MODE_LOWER, "factorising H")?;
        self.potri(layer, &mut a, n)?;
        let n_i = n as i32;
        let mut launch = stream.launch_builder(&self.symmetrize_lower);
        launch.arg(&mut a).arg(&n_i);
        // SAFETY: a holds n² values.
        unsafe { launch.launch(per_element(n * n)) }.during("launching symmetrize_lower")?;
        self.potrf(layer, &mut a, n, CUBLAS_FILL_MODE_UPPER, "factorising H⁻¹")?;
        let mut u = stream.alloc_zeros::<f32>(n * n).during("allocating U")?;
        let mut launch = stream.launch_builder(&self.upper_to_row_major);
        launch.arg(&a).arg(&n_i).arg(&mut u);
        // SAFETY: a and u hold n² values.
        unsafe { launch.launch(per_element(n * n)) }.during("launching upper_to_row_major")?;
        Ok(u)
    }

    fn potrf(
        &self,
        layer: &str,
        a: &mut CudaSlice<f64>,
        n: usize,
        uplo: solver_sys::cublasFillMode_t,
        step: &'static str,
    ) -> Result<(), GpuError> {
        self.factor(layer, a, n, uplo, Factorisation::Cholesky, step)
    }

    fn potri(&self, layer: &str, a: &mut CudaSlice<f64>, n: usize) -> Result<(), GpuError> {
        use solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
        self.factor(
            layer,
            a,
            n,
            CUBLAS_FILL_MODE_LOWER,
            Factorisation::InverseFromCholesky,
            "inverting H",
        )
    }

    /// One cuSOLVER dense call on `a` (`n × n`, in place): size the
    /// workspace, run, and turn devInfo into an error naming the layer.
    fn factor(
        &self,
        layer: &str,
        a: &mut CudaSlice<f64>,
        n: usize,
        uplo: solver_sys::cublasFillMode_t,
        which: Factorisation,
        step: &'static str,
    ) -> Result<(), GpuError> {
        let stream = self.gpu.stream();
        let handle = self.gpu.solver()?.cu();
        let n_i = n as i32;
        let mut lwork = 0i32;
        let mut info = stream.alloc_zeros::<i32>(1).during("allocating devInfo")?;
        {
            let (ptr, _guard) = a.device_ptr_mut(stream);
            let ptr = ptr as *mut f64;
            // SAFETY: a holds n² doubles; lwork is a host out-parameter.
            let status = unsafe {
                match which {
                    Factorisation::Cholesky => solver_sys::cusolverDnDpotrf_bufferSize(
                        handle, uplo, n_i, ptr, n_i, &mut lwork,
                    ),
                    Factorisation::InverseFromCholesky => solver_sys::cusolverDnDpotri_bufferSize(
                        handle, uplo, n_i, ptr, n_i, &mut lwork,
                    ),
                }
            };
            solver_status(status, step)?;
        }
        let mut work = stream
            .alloc_zeros::<f64>(lwork.max(1) as usize)
            .during("allocating cuSOLVER's workspace")?;
        {
            let (ptr, _g1) = a.device_ptr_mut(stream);
            let (wptr, _g2) = work.device_ptr_mut(stream);
            let (iptr, _g3) = info.device_ptr_mut(stream);
            let (ptr, wptr, iptr) = (ptr as *mut f64, wptr as *mut f64, iptr as *mut i32);
            // SAFETY: a holds n² doubles, work lwork, info one int; all on the solver's stream.
            let status = unsafe {
                match which {
                    Factorisation::Cholesky => {
                        solver_sys::cusolverDnDpotrf(handle, uplo, n_i, ptr, n_i, wptr, lwork, iptr)
                    }
                    Factorisation::InverseFromCholesky => {
                        solver_sys::cusolverDnDpotri(handle, uplo, n_i, ptr, n_i, wptr, lwork, iptr)
                    }
                }
            };
            solver_status(status, step)?;
        }
        check_info(layer, &info, stream, step)
    }

    /// `(q - zp) · scale` of integer codes on the device.
    fn dequantize_int_device(
        &self,
        codes: &CudaSlice<i8>,
        shape: [usize; 2],
        groups: usize,
        grid: &DeviceGrid,
        symmetric: bool,
        g_idx: Option<&[i32]>,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let [rows, cols] = shape;
        let stream = self.gpu.stream();
        let mut out = stream
            .alloc_zeros::<f32>(rows * cols)
            .during("allocating the dequantized weight")?;
        let g_idx_dev = match g_idx {
            Some(idx) => Some(stream.clone_htod(idx).during("uploading g_idx")?),
            None => None,
        };
        let (rows_l, cols_i, groups_i) = (rows as i64, cols as i32, groups as i32);
        let null = 0u64;
        let mut launch = stream.launch_builder(&self.dequantize_int);
        launch
            .arg(codes)
            .arg(&rows_l)
            .arg(&cols_i)
            .arg(&groups_i)
            .arg(&grid.scales);
        if symmetric {
            launch.arg(&null);
        } else {
            launch.arg(&grid.zeros);
        }
        match &g_idx_dev {
            Some(idx) => {
                launch.arg(idx);
            }
            None => {
                launch.arg(&null);
            }
        }
        launch.arg(&mut out);
        // SAFETY: codes and out hold rows·cols values, scales/zeros rows·groups, g_idx cols.
        unsafe { launch.launch(per_element(rows * cols)) }.during("launching dequantize_int")?;
        Ok(out)
    }

    /// The weight recomputed from a quantized Linear's stored codes, on the device.
    pub fn dequantize(&self, q: &QuantizedLinear) -> Result<CudaSlice<f32>, GpuError> {
        let [rows, cols] = q.shape;
        let stream = self.gpu.stream();
        match &q.codes {
            Codes::Int(_) | Codes::Packed(_) => {
                let codes = q.codes.ints(q.shape).ok_or_else(|| {
                    shape_error(
                        "integer codes".to_string(),
                        format!("{rows} × {cols} codes"),
                        "codes that do not fill the shape".to_string(),
                    )
                })?;
                let codes = stream
                    .clone_htod(codes.as_ref())
                    .during("uploading codes")?;
                let grid = DeviceGrid {
                    scales: stream
                        .clone_htod(&q.scales.data)
                        .during("uploading scales")?,
                    zeros: match &q.zero_points {
                        Some(z) => {
                            let z: Vec<i32> = z.iter().map(|&v| i32::from(v)).collect();
                            stream.clone_htod(&z).during("uploading zero points")?
                        }
                        None => stream
                            .alloc_zeros::<i32>(1)
                            .during("allocating zero points")?,
                    },
                };
                self.dequantize_int_device(
                    &codes,
                    q.shape,
                    q.scales.cols.max(1),
                    &grid,
                    q.zero_points.is_none(),
                    q.g_idx.as_deref(),
                )
            }
            Codes::Fp8(codes) => {
                let codes = stream.clone_htod(codes).during("uploading codes")?;
                let scales = stream
                    .clone_htod(&q.scales.data)
                    .during("uploading scales")?;
                let mut out = stream
                    .alloc_zeros::<f32>(rows * cols)
                    .during("allocating the weight")?;
                let (rows_l, cols_i) = (rows as i64, cols as i32);
                let mut launch = stream.launch_builder(&self.dequantize_fp8);
                launch
                    .arg(&codes)
                    .arg(&rows_l)
                    .arg(&cols_i)
                    .arg(&scales)
                    .arg(&mut out);
                // SAFETY: codes and out hold rows·cols values, scales rows.
                unsafe { launch.launch(per_element(rows * cols)) }
                    .during("launching dequantize_fp8")?;
                Ok(out)
            }
        }
    }
}

fn check_len(layer: &str, w: &CudaSlice<f32>, [rows, cols]: [usize; 2]) -> Result<(), GpuError> {
    if w.len() != rows * cols {
        return Err(shape_error(
            format!("{layer} weight"),
            format!("{} values for [{rows}, {cols}]", rows * cols),
            format!("{} values", w.len()),
        ));
    }
    Ok(())
}

fn solver_status(status: solver_sys::cusolverStatus_t, action: &str) -> Result<(), GpuError> {
    if status == solver_sys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(GpuError::Cusolver {
            action: action.to_string(),
            status: format!("{status:?}"),
        })
    }
}

/// cuSOLVER's devInfo: > 0 is the first non-positive pivot.
fn check_info(
    layer: &str,
    info: &CudaSlice<i32>,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    step: &'static str,
) -> Result<(), GpuError> {
    let info = stream.clone_dtoh(info).during("reading devInfo")?;
    match info.first().copied().unwrap_or(0) {
        0 => Ok(()),
        column if column > 0 => Err(GpuError::NotPositiveDefinite {
            layer: layer.to_string(),
            column,
            step,
        }),
        other => Err(GpuError::Cusolver {
            action: step.to_string(),
            status: format!("invalid argument {}", -other),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::pack_rows;
    use crate::gpu::tests::gpu_or_skip;
    use crate::quant::{CpuBackend, QuantBackend};

    /// A deterministic weight with a spread of values in every group.
    fn weight(rows: usize, cols: usize) -> Matrix {
        let data = (0..rows * cols)
            .map(|k| ((k * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (k % 5) as f32))
            .collect();
        Matrix { rows, cols, data }
    }

    #[test]
    fn gpu_codes_are_packed_on_the_device_as_the_writer_packs_them() {
        let Some(gpu) = gpu_or_skip() else { return };
        let q = DeviceQuantizer::new(&gpu).expect("kernels");
        // 4 and 8 bits come back packed, 2 bits one byte each; 1030 columns
        // leave a partial last word per row (6 of 8 nibbles, 2 of 4 bytes).
        for (bits, group_size, cols) in [
            (4, Some(128), 512),
            (4, None, 1030),
            (8, None, 1030),
            (2, None, 1030),
        ] {
            let rows = 24;
            let w = weight(rows, cols);
            let scheme = IntScheme {
                bits,
                symmetric: false,
                group_size,
                scale_dtype: FloatDtype::F16,
            };
            let cpu = CpuBackend.quantize_rtn("w", &w, scheme).expect("cpu rtn");
            let dev_w = gpu.stream().clone_htod(&w.data).expect("upload");
            let out = q.rtn("w", &dev_w, [rows, cols], scheme).expect("gpu rtn");
            let Codes::Int(cpu_codes) = &cpu.codes else {
                panic!("the CPU keeps codes unpacked")
            };
            match &out.linear.codes {
                Codes::Packed(p) => {
                    assert!(pack::packs(bits), "{bits} bits packed");
                    assert_eq!(p.bits, bits);
                    let host: Vec<u8> = pack_rows(cpu_codes, rows, cols, bits)
                        .iter()
                        .flat_map(|w| w.to_le_bytes())
                        .collect();
                    assert_eq!(p.words, host, "{bits}-bit words of {cols} columns");
                }
                Codes::Int(codes) => {
                    assert!(!pack::packs(bits), "{bits} bits unpacked");
                    assert_eq!(codes, cpu_codes);
                }
                Codes::Fp8(_) => panic!("integer scheme gave FP8 codes"),
            }
            assert_eq!(out.linear.codes_differing(&cpu), Some(0));
        }
    }
}
