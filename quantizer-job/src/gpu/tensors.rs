//! Checkpoint tensors onto the device at their stored size: F16/BF16 bytes
//! are uploaded as they are and widened to f32 by a kernel, which halves the
//! host-to-device traffic and skips the host conversion that otherwise
//! dominates a weight-only quantization.

use cudarc::driver::{CudaSlice, CudaViewMut, PushKernelArg};
use safetensors::Dtype;

use super::error::DriverContext;
use super::quant::per_element;
use super::{Gpu, GpuError};
use crate::checkpoint::{Checkpoint, CheckpointError, RawTensor};
use crate::quant::QuantError;

/// Why a checkpoint tensor did not reach the device.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// Uploads checkpoint tensor `name` as f32, returning it with its shape.
pub fn upload_f32(
    gpu: &Gpu,
    checkpoint: &Checkpoint,
    name: &str,
) -> Result<(CudaSlice<f32>, Vec<usize>), UploadError> {
    let raw = checkpoint.raw(name)?;
    Ok((upload_raw_f32(gpu, name, &raw)?, raw.shape))
}

/// Uploads a tensor already looked up in the checkpoint as f32.
pub(super) fn upload_raw_f32(
    gpu: &Gpu,
    name: &str,
    raw: &RawTensor<'_>,
) -> Result<CudaSlice<f32>, UploadError> {
    let stream = gpu.stream();
    let values = match raw.dtype {
        Dtype::F32 => {
            let host: Vec<f32> = raw
                .bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            stream
                .clone_htod(&host)
                .during(format!("uploading {name}"))?
        }
        dtype => {
            // The stored little-endian halves, as bytes: the kernel reads
            // them as 16-bit values (x86-64 and the GPU are little-endian).
            let src = stream
                .clone_htod(raw.bytes)
                .during(format!("uploading {name}"))?;
            widen(gpu, name, dtype, &src, raw.bytes.len() / 2)?
        }
    };
    Ok(values)
}

/// The first `n` F16/BF16 values of the device bytes `src`, as f32.
pub(super) fn widen(
    gpu: &Gpu,
    name: &str,
    dtype: Dtype,
    src: &CudaSlice<u8>,
    n: usize,
) -> Result<CudaSlice<f32>, GpuError> {
    let stream = gpu.stream();
    let mut dst = gpu.buffer_to_fill::<f32>(n, name)?;
    let code: i32 = if dtype == Dtype::BF16 { 1 } else { 0 };
    let n_l = n as i64;
    let f = gpu.quant_fn("widen_to_f32")?;
    let mut launch = stream.launch_builder(&f);
    launch.arg(src).arg(&code).arg(&n_l).arg(&mut dst);
    // SAFETY: the caller's src holds at least 2n bytes (n halves), dst n values.
    unsafe { launch.launch(per_element(n)) }.during("launching widen_to_f32")?;
    Ok(dst)
}

/// The rows `ids` of a device table `[rows, width]`, as `[ids.len(), width]`.
pub fn gather_rows(
    gpu: &Gpu,
    table: &CudaSlice<f32>,
    width: usize,
    ids: &[u32],
) -> Result<CudaSlice<f32>, GpuError> {
    let mut out = gpu
        .stream()
        .alloc_zeros::<f32>(ids.len() * width)
        .during("allocating gathered rows")?;
    gather_rows_into(gpu, table, width, ids, &mut out.as_view_mut())?;
    Ok(out)
}

/// Writes the rows `ids` of a device table `[rows, width]` into `out`
/// (`[ids.len(), width]`, e.g. a slice of a larger buffer): how the
/// embeddings and AWQ's kept activation rows are taken, without a copy.
pub fn gather_rows_into(
    gpu: &Gpu,
    table: &CudaSlice<f32>,
    width: usize,
    ids: &[u32],
    out: &mut CudaViewMut<'_, f32>,
) -> Result<(), GpuError> {
    let n = ids.len() * width;
    let rows = table.len() / width.max(1);
    if out.len() != n || rows * width != table.len() {
        return Err(QuantError::Shape {
            what: "gathered rows".to_string(),
            expected: format!(
                "a [rows, {width}] table and {n} values for {} rows",
                ids.len()
            ),
            got: format!("{} table values, {} output values", table.len(), out.len()),
        }
        .into());
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= rows) {
        return Err(QuantError::Shape {
            what: "gathered row id".to_string(),
            expected: format!("below {rows}"),
            got: id.to_string(),
        }
        .into());
    }
    if n == 0 {
        return Ok(());
    }
    let stream = gpu.stream();
    let ids_dev = stream.clone_htod(ids).during("uploading row ids")?;
    let (tokens, width_i) = (ids.len() as i64, width as i32);
    let f = gpu.quant_fn("gather_rows")?;
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(table)
        .arg(&ids_dev)
        .arg(&tokens)
        .arg(&width_i)
        .arg(out);
    // SAFETY: every id is below the table's rows (checked above); out holds
    // ids.len() · width values.
    unsafe { launch.launch(per_element(n)) }.during("launching gather_rows")?;
    Ok(())
}
