//! AWQ's search on the device: the twin of [`crate::quant::awq_search`].
//!
//! The expensive parts move to the GPU: each scale candidate's output error
//! (a fake-quantize kernel, then `X · Δᵀ` by cuBLAS, then a sum of squares)
//! and the per-group clipping search, which scores every shrink ratio by
//! `dᵀ G d` with `G` the group's block of `Σ xᵀx` (one strided-batched GEMM)
//! instead of re-multiplying the activations. The per-channel means are
//! summed in the CPU's order, so the candidate scales are bit-identical;
//! the errors differ by summation order only, so the chosen α and clips
//! agree with the CPU except on near-ties (gpu-check bounds the difference).
//!
//! [`DeviceAwq::search_on_device`] works on device-resident weights and
//! inputs (the layer-streamed pipeline's); [`DeviceAwq::search`], for callers
//! with host matrices ([`super::CudaBackend`]), uploads them and calls it.
//! The folds of `1/s` into the op before a group are here too, so the
//! pipeline never copies a weight to the host.

use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::Gpu;
use super::error::{DriverContext, GpuError};
use super::quant::{DeviceQuantized, DeviceQuantizer, dtype_code, per_element, per_team};
use super::tensors::gather_rows;
use crate::quant::awq::{
    check_inputs, check_linear_fold, check_norm_fold, clip_steps, search_scales, skips_clip,
    subsample, subsample_rows,
};
use crate::quant::{AwqConfig, AwqResult, IntScheme, Matrix, QuantError};

/// Largest group the clipping kernel holds in shared memory (two floats per
/// weight; 48 KiB is every GPU's default limit).
pub(crate) const MAX_CLIP_GROUP: usize = 4096;

/// The AWQ kernels, next to the quantizer that rounds the result.
pub struct DeviceAwq<'q, 'g> {
    quantizer: &'q DeviceQuantizer<'g>,
    column_abs_sum: CudaFunction,
    group_normalized_abs: CudaFunction,
    scale_columns: CudaFunction,
    scale_rows: CudaFunction,
    awq_delta: CudaFunction,
    sum_squares: CudaFunction,
    awq_clip: CudaFunction,
}

/// A row-major `[rows, cols]` matrix on the device, borrowed, with the name
/// errors and logs use: a Linear's weight (`[out, in]`) or its inputs.
#[derive(Clone, Copy, Debug)]
pub struct DeviceMatrix<'a> {
    pub name: &'a str,
    pub data: &'a CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl<'a> DeviceMatrix<'a> {
    /// Other values of the same name and shape (a scaled or clipped copy).
    fn with_data<'b>(&self, data: &'b CudaSlice<f32>) -> DeviceMatrix<'b>
    where
        'a: 'b,
    {
        DeviceMatrix { data, ..*self }
    }

    /// Fails unless the buffer holds exactly `rows · cols` values: the
    /// kernels' bounds rest on it.
    fn check(&self) -> Result<(), GpuError> {
        if self.data.len() != self.rows * self.cols {
            return Err(QuantError::Shape {
                what: format!("{} on the device", self.name),
                expected: format!(
                    "{} values for [{}, {}]",
                    self.rows * self.cols,
                    self.rows,
                    self.cols
                ),
                got: format!("{} values", self.data.len()),
            }
            .into());
        }
        Ok(())
    }
}

/// What [`DeviceAwq::search_on_device`] found: as [`AwqResult`], with each
/// Linear's result still holding its dequantized weight on the device (the
/// GPU pipeline puts it back into the layer) and the scales on the device
/// too (the pipeline folds them into the op before).
pub struct DeviceAwqResult {
    /// Per-input-channel scales `s`; all ones when scaling did not help.
    pub scales: Vec<f32>,
    /// The same scales on the device.
    pub device_scales: CudaSlice<f32>,
    /// The chosen α; `None` when the identity scaling won.
    pub alpha: Option<f32>,
    /// `Q(W·s)` per input Linear, in the order given.
    pub layers: Vec<DeviceQuantized>,
    /// Output error of the chosen scales before clipping, summed over the Linears.
    pub search_error: f64,
}

impl<'q, 'g> DeviceAwq<'q, 'g> {
    /// Loads the AWQ kernels from the GPU's compiled module.
    pub fn new(quantizer: &'q DeviceQuantizer<'g>) -> Result<Self, GpuError> {
        let gpu = quantizer.gpu();
        Ok(Self {
            quantizer,
            column_abs_sum: gpu.quant_fn("column_abs_sum")?,
            group_normalized_abs: gpu.quant_fn("group_normalized_abs")?,
            scale_columns: gpu.quant_fn("scale_columns")?,
            scale_rows: gpu.quant_fn("scale_rows")?,
            awq_delta: gpu.quant_fn("awq_delta")?,
            sum_squares: gpu.quant_fn("sum_squares")?,
            awq_clip: gpu.quant_fn("awq_clip")?,
        })
    }

    fn gpu(&self) -> &'g Gpu {
        self.quantizer.gpu()
    }

    fn upload(&self, m: &Matrix) -> Result<CudaSlice<f32>, GpuError> {
        self.gpu()
            .stream()
            .clone_htod(&m.data)
            .during("uploading an AWQ input")
    }

    /// Searches scales and clipping for Linears sharing the input `x`, as
    /// [`crate::quant::awq_search`] does, and rounds the result on the device:
    /// the entry point for callers holding host matrices, which uploads them
    /// and runs [`Self::search_on_device`].
    pub fn search(
        &self,
        layers: &[(&str, &Matrix)],
        x: &Matrix,
        scheme: IntScheme,
        config: &AwqConfig,
    ) -> Result<AwqResult, GpuError> {
        let shapes: Vec<(&str, [usize; 2])> = layers
            .iter()
            .map(|(name, w)| (*name, [w.rows, w.cols]))
            .collect();
        // Checked before anything is uploaded, so an empty input is the
        // CPU's error and not a failed zero-byte copy.
        check_inputs(&shapes, [x.rows, x.cols], &scheme)?;
        // Only the rows the search uses travel; the device search's own
        // subsampling then keeps them all.
        let x = subsample(x, config.max_samples);
        let xs = self.upload(&x)?;
        let uploaded = layers
            .iter()
            .map(|(_, w)| self.upload(w))
            .collect::<Result<Vec<_>, _>>()?;
        let weights: Vec<DeviceMatrix> = layers
            .iter()
            .zip(&uploaded)
            .map(|((name, w), data)| DeviceMatrix {
                name,
                data,
                rows: w.rows,
                cols: w.cols,
            })
            .collect();
        let inputs = DeviceMatrix {
            name: "inputs",
            data: &xs,
            rows: x.rows,
            cols: x.cols,
        };
        let found = self.search_on_device(&weights, inputs, scheme, config)?;
        Ok(AwqResult {
            scales: found.scales,
            alpha: found.alpha,
            layers: found.layers.into_iter().map(|q| q.linear).collect(),
            search_error: found.search_error,
        })
    }

    /// The search on device-resident weights and inputs `x` (`[rows, in]`,
    /// e.g. the activation rows the GPU pipeline kept), subsampled here to
    /// `config.max_samples` rows as the CPU twin does. The weights are only
    /// read; the caller decides what to do with `Q(W·s)` and the scales.
    pub fn search_on_device(
        &self,
        layers: &[DeviceMatrix],
        x: DeviceMatrix,
        scheme: IntScheme,
        config: &AwqConfig,
    ) -> Result<DeviceAwqResult, GpuError> {
        let shapes: Vec<(&str, [usize; 2])> =
            layers.iter().map(|w| (w.name, [w.rows, w.cols])).collect();
        let group_size = check_inputs(&shapes, [x.rows, x.cols], &scheme)?;
        x.check()?;
        for w in layers {
            w.check()?;
        }
        let gathered = match subsample_rows(x.rows, config.max_samples) {
            Some(rows) => {
                let ids = rows
                    .iter()
                    .map(|&r| u32::try_from(r))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| QuantError::Shape {
                        what: format!("{} for AWQ", x.name),
                        expected: "fewer than 2^32 rows".to_string(),
                        got: format!("{} rows", x.rows),
                    })?;
                Some((gather_rows(self.gpu(), x.data, x.cols, &ids)?, ids.len()))
            }
            None => None,
        };
        let xs = match &gathered {
            Some((data, rows)) => DeviceMatrix {
                data,
                rows: *rows,
                ..x
            },
            None => x,
        };

        let x_mean = self.column_means(&[xs], None)?;
        let w_mean = self.column_means(layers, Some(group_size))?;
        let widest = layers.iter().map(|w| w.rows).max().unwrap_or(0);
        let stream = self.gpu().stream();
        let mut delta = stream
            .alloc_zeros::<f32>(widest * xs.cols)
            .during("allocating AWQ's weight error")?;
        let mut y = stream
            .alloc_zeros::<f32>(widest * xs.rows)
            .during("allocating AWQ's output error")?;
        let choice = search_scales(&x_mean, &w_mean, config, |s| {
            self.output_error(xs, layers, s, group_size, &scheme, &mut delta, &mut y)
        })?;
        drop((delta, y));

        let scales = stream
            .clone_htod(&choice.scales)
            .during("uploading AWQ's scales")?;
        let scaled_x = self.scale(xs, &scales, true)?;
        let scaled_x = xs.with_data(&scaled_x);
        let clipping = layers.iter().any(|w| !skips_clip(config, w.name));
        let gram = if clipping && group_size <= MAX_CLIP_GROUP {
            Some(self.group_grams(scaled_x, group_size)?)
        } else {
            None
        };
        let mut out = Vec::with_capacity(layers.len());
        for w in layers {
            let scaled = self.scale(*w, &scales, false)?;
            let ws = if skips_clip(config, w.name) {
                scaled
            } else {
                let scaled = w.with_data(&scaled);
                match &gram {
                    Some(gram) => self.clip(scaled, gram, group_size, &scheme, config)?,
                    None => self.clip_on_host(scaled, scaled_x, group_size, scheme, config)?,
                }
            };
            out.push(self.quantizer.rtn(w.name, &ws, [w.rows, w.cols], scheme)?);
        }
        Ok(DeviceAwqResult {
            scales: choice.scales,
            device_scales: scales,
            alpha: choice.alpha,
            layers: out,
            search_error: choice.loss,
        })
    }

    /// `gamma / s` element-wise: AWQ's `1/s` folded into the RMSNorm before a
    /// group, as [`crate::quant::fold_into_norm`] does (the same IEEE
    /// division, so the result is the CPU's bit for bit). Returns the new weight.
    pub fn fold_into_norm(
        &self,
        gamma: &CudaSlice<f32>,
        scales: &CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>, GpuError> {
        check_norm_fold(gamma.len(), scales.len())?;
        let norm = DeviceMatrix {
            name: "norm weight",
            data: gamma,
            rows: 1,
            cols: gamma.len(),
        };
        self.scale(norm, scales, true)
    }

    /// `W[c, :] / s[c]`: AWQ's `1/s` folded into the output rows of the
    /// Linear before a group, as [`crate::quant::fold_into_linear`] does.
    /// Returns the new weight.
    pub fn fold_into_linear(
        &self,
        w: DeviceMatrix,
        scales: &CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>, GpuError> {
        w.check()?;
        check_linear_fold(w.rows, scales.len())?;
        self.launch_scale(&self.scale_rows, w, scales, true, "scale_rows")
    }

    /// Mean per column over all rows of `mats`: of `|x|`, or with a group
    /// size of `|w|` over its (row, group)'s max, as the CPU twin computes them.
    fn column_means(
        &self,
        mats: &[DeviceMatrix],
        group_size: Option<usize>,
    ) -> Result<Vec<f32>, GpuError> {
        let stream = self.gpu().stream();
        let cols = mats.first().map_or(0, |m| m.cols);
        let mut acc = stream
            .alloc_zeros::<f64>(cols)
            .during("allocating column sums")?;
        let mut rows = 0usize;
        for m in mats {
            let normalized = match group_size {
                Some(gs) => Some(self.normalized_abs(*m, gs)?),
                None => None,
            };
            let src = normalized.as_ref().unwrap_or(m.data);
            let (rows_i, cols_i) = (m.rows as i64, m.cols as i32);
            let mut launch = stream.launch_builder(&self.column_abs_sum);
            launch.arg(src).arg(&rows_i).arg(&cols_i).arg(&mut acc);
            // SAFETY: src holds rows·cols values, acc cols; one thread per column.
            unsafe { launch.launch(per_element(m.cols)) }.during("launching column_abs_sum")?;
            rows += m.rows;
        }
        let sums = stream.clone_dtoh(&acc).during("downloading column sums")?;
        Ok(sums.iter().map(|s| (s / rows as f64) as f32).collect())
    }

    fn normalized_abs(
        &self,
        w: DeviceMatrix,
        group_size: usize,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let stream = self.gpu().stream();
        let mut out = stream
            .alloc_zeros::<f32>(w.data.len())
            .during("allocating normalised weights")?;
        let items = w.rows * (w.cols / group_size);
        let (cfg, team) = per_team(items, group_size);
        let (rows, cols, gs) = (w.rows as i32, w.cols as i32, group_size as i32);
        let mut launch = stream.launch_builder(&self.group_normalized_abs);
        launch
            .arg(w.data)
            .arg(&rows)
            .arg(&cols)
            .arg(&gs)
            .arg(&team)
            .arg(&mut out);
        // SAFETY: w and out hold rows·cols values; one team per (row, group).
        unsafe { launch.launch(cfg) }.during("launching group_normalized_abs")?;
        Ok(out)
    }

    /// `x · diag(s)`, or `x · diag(s)⁻¹` when `divide`.
    fn scale(
        &self,
        x: DeviceMatrix,
        s: &CudaSlice<f32>,
        divide: bool,
    ) -> Result<CudaSlice<f32>, GpuError> {
        self.launch_scale(&self.scale_columns, x, s, divide, "scale_columns")
    }

    /// One of the element-wise scaling kernels (`scale_columns`: `s` per
    /// column; `scale_rows`: `s` per row) into a new buffer.
    fn launch_scale(
        &self,
        kernel: &CudaFunction,
        x: DeviceMatrix,
        s: &CudaSlice<f32>,
        divide: bool,
        what: &str,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let stream = self.gpu().stream();
        let n = x.data.len();
        let mut data = stream
            .alloc_zeros::<f32>(n)
            .during("allocating scaled values")?;
        let (n_i, cols, div) = (n as i64, x.cols as i32, i32::from(divide));
        let mut launch = stream.launch_builder(kernel);
        launch
            .arg(x.data)
            .arg(&n_i)
            .arg(&cols)
            .arg(s)
            .arg(&div)
            .arg(&mut data);
        // SAFETY: x and data hold n = rows·cols values; s one per column
        // (scale_columns) or per row (scale_rows), as the callers checked.
        unsafe { launch.launch(per_element(n)) }.during(format!("launching {what}"))?;
        Ok(data)
    }

    /// `Σ_layers ‖X (W − Q(W·s)/s)ᵀ‖²`, the loss of one scale candidate.
    #[allow(clippy::too_many_arguments)]
    fn output_error(
        &self,
        x: DeviceMatrix,
        weights: &[DeviceMatrix],
        s: &[f32],
        group_size: usize,
        scheme: &IntScheme,
        delta: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<f64, GpuError> {
        let stream = self.gpu().stream();
        let s = stream.clone_htod(s).during("uploading candidate scales")?;
        let mut total = stream.alloc_zeros::<f64>(1).during("allocating the loss")?;
        let (bits, sym) = (i32::from(scheme.bits), i32::from(scheme.symmetric));
        let (dtype, eps) = (dtype_code(scheme.scale_dtype), scheme.scale_dtype.eps());
        for w in weights {
            let items = w.rows * (w.cols / group_size);
            let (cfg, team) = per_team(items, group_size);
            let (rows, cols, gs) = (w.rows as i32, w.cols as i32, group_size as i32);
            let mut launch = stream.launch_builder(&self.awq_delta);
            launch.arg(w.data).arg(&s).arg(&rows).arg(&cols).arg(&gs);
            launch.arg(&bits).arg(&sym).arg(&dtype).arg(&eps).arg(&team);
            launch.arg(&mut *delta);
            // SAFETY: delta holds at least rows·cols values (the widest layer);
            // s one per column; one team per (row, group).
            unsafe { launch.launch(cfg) }.during("launching awq_delta")?;
            // Column-major: Y (out × n, ld out) = Δᵀ (out × in) · X (in × n, ld in).
            let gemm = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: w.rows as i32,
                n: x.rows as i32,
                k: x.cols as i32,
                alpha: 1.0f32,
                lda: x.cols as i32,
                ldb: x.cols as i32,
                beta: 0.0f32,
                ldc: w.rows as i32,
            };
            // SAFETY: delta has out·in values, x n·in, y at least out·n.
            unsafe { self.gpu().blas()?.gemm(gemm, &*delta, x.data, &mut *y) }
                .during("AWQ's output error")?;
            let len = (w.rows * x.rows) as i64;
            let cfg = LaunchConfig {
                grid_dim: (((len as u64).div_ceil(256)).clamp(1, 1024) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = stream.launch_builder(&self.sum_squares);
            launch.arg(&*y).arg(&len).arg(&mut total);
            // SAFETY: y holds at least len values; total one.
            unsafe { launch.launch(cfg) }.during("launching sum_squares")?;
        }
        let total = stream.clone_dtoh(&total).during("downloading the loss")?;
        Ok(total.first().copied().unwrap_or(0.0))
    }

    /// Each group's `Σ_t x_t x_tᵀ` (`[groups, gs, gs]`) by one strided-batched GEMM.
    fn group_grams(&self, x: DeviceMatrix, group_size: usize) -> Result<CudaSlice<f32>, GpuError> {
        let groups = x.cols / group_size;
        let mut gram = self
            .gpu()
            .stream()
            .alloc_zeros::<f32>(groups * group_size * group_size)
            .during("allocating the group Gram matrices")?;
        // Column-major, X is (in × n, ld in); group g is its rows g·gs.. so
        // G_g (gs × gs) = X_g · X_gᵀ, each batch offset by gs values.
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_T,
                m: group_size as i32,
                n: group_size as i32,
                k: x.rows as i32,
                alpha: 1.0f32,
                lda: x.cols as i32,
                ldb: x.cols as i32,
                beta: 0.0f32,
                ldc: group_size as i32,
            },
            batch_size: groups as i32,
            stride_a: group_size as i64,
            stride_b: group_size as i64,
            stride_c: (group_size * group_size) as i64,
        };
        let blas = self.gpu().blas()?;
        // SAFETY: batch g reads rows g·gs..(g+1)·gs of every column of X
        // (within n·in values) and writes gs² values at g·gs².
        unsafe { blas.gemm_strided_batched(cfg, x.data, x.data, &mut gram) }
            .during("AWQ's group Gram matrices")?;
        Ok(gram)
    }

    /// The clipping search on the device; returns the clamped weight.
    fn clip(
        &self,
        w: DeviceMatrix,
        gram: &CudaSlice<f32>,
        group_size: usize,
        scheme: &IntScheme,
        config: &AwqConfig,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let stream = self.gpu().stream();
        let mut data = stream
            .alloc_zeros::<f32>(w.data.len())
            .during("allocating the clipped weight")?;
        let items = w.rows * (w.cols / group_size);
        let threads = group_size.next_multiple_of(32).min(256) as u32;
        let cfg = LaunchConfig {
            grid_dim: (items as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: (2 * group_size * size_of::<f32>()) as u32,
        };
        let (rows, cols, gs) = (w.rows as i32, w.cols as i32, group_size as i32);
        let (steps, grid) = (clip_steps(config) as i32, config.clip_grid as i32);
        let (bits, sym) = (i32::from(scheme.bits), i32::from(scheme.symmetric));
        let (dtype, eps) = (dtype_code(scheme.scale_dtype), scheme.scale_dtype.eps());
        let mut launch = stream.launch_builder(&self.awq_clip);
        launch.arg(w.data).arg(gram).arg(&rows).arg(&cols).arg(&gs);
        launch
            .arg(&steps)
            .arg(&grid)
            .arg(&bits)
            .arg(&sym)
            .arg(&dtype);
        launch.arg(&eps).arg(&mut data);
        // SAFETY: w and data hold rows·cols values, gram groups·gs²; one
        // block per (row, group) with 2·gs floats of shared memory.
        unsafe { launch.launch(cfg) }.during("launching awq_clip")?;
        Ok(data)
    }

    /// Groups too wide for the kernel's shared memory clip on the CPU twin.
    fn clip_on_host(
        &self,
        w: DeviceMatrix,
        x: DeviceMatrix,
        group_size: usize,
        scheme: IntScheme,
        config: &AwqConfig,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let stream = self.gpu().stream();
        let download = |m: DeviceMatrix| -> Result<Matrix, GpuError> {
            let data = stream
                .clone_dtoh(m.data)
                .during("downloading for the CPU clip")?;
            Ok(Matrix::new(m.rows, m.cols, data)?)
        };
        let clipped = crate::quant::awq::clip_search(
            &download(w)?,
            &download(x)?,
            group_size,
            scheme,
            config,
        );
        self.upload(&clipped)
    }
}
