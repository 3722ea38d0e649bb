//! Transfers through page-locked memory: checkpoint tensors streamed to the
//! device, read ahead on a host thread, and results downloaded.
//!
//! A weight-only quantization (RTN, INT8, FP8) does milliseconds of kernel
//! work per Linear; its time is reading the checkpoint and moving it over
//! PCIe. Uploading from the mapped file directly makes the driver stage
//! every byte through its own pinned buffer, synchronously, with the page
//! faults of the first read in line. Here a reader thread reads the next
//! tensor from the file into one of two page-locked buffers (positional
//! reads of 1 MiB chunks on several cores) while the device copies and
//! quantizes the current one.

use std::cell::RefCell;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

use cudarc::driver::{CudaSlice, CudaView, PinnedHostSlice};
use rayon::prelude::*;
use safetensors::Dtype;

use super::error::DriverContext;
use super::tensors::{UploadError, upload_raw_f32, widen};
use super::{Gpu, GpuError};
use crate::checkpoint::{Checkpoint, RawTensor};

/// Staging buffers: one being filled while the other is copied to the device.
const STAGING_BUFFERS: usize = 2;
/// Bytes per parallel copy chunk.
const COPY_CHUNK: usize = 1 << 20;

/// Uploads each tensor of `names` as f32 and hands it to `consume` with its
/// shape, in order, reading the next one ahead while `consume` runs.
pub fn for_each_f32<F>(
    gpu: &Gpu,
    checkpoint: &Checkpoint,
    names: &[String],
    mut consume: F,
) -> anyhow::Result<()>
where
    F: FnMut(&str, CudaSlice<f32>, Vec<usize>) -> anyhow::Result<()>,
{
    let raws = names
        .iter()
        .map(|name| checkpoint.raw(name))
        .collect::<Result<Vec<_>, _>>()?;
    // F32 tensors need no widening and are rare in checkpoints: uploaded as they are.
    if raws.iter().any(|raw| raw.dtype == Dtype::F32) {
        for (name, raw) in names.iter().zip(&raws) {
            consume(name, upload_raw_f32(gpu, name, raw)?, raw.shape.clone())?;
        }
        return Ok(());
    }
    let largest = raws.iter().map(|raw| raw.bytes.len()).max().unwrap_or(0);
    if largest == 0 {
        return Ok(());
    }
    let (empty_tx, empty_rx) = mpsc::channel::<PinnedHostSlice<u8>>();
    for _ in 0..STAGING_BUFFERS {
        // SAFETY: the buffer is written before any byte of it is read.
        let buffer = unsafe { gpu.context().alloc_pinned::<u8>(largest) }
            .during("allocating a page-locked staging buffer")?;
        empty_tx
            .send(buffer)
            .map_err(|_| anyhow::anyhow!("the staging reader stopped before it began"))?;
    }
    let (full_tx, full_rx) = mpsc::sync_channel::<PinnedHostSlice<u8>>(STAGING_BUFFERS);

    std::thread::scope(|scope| {
        let raws = &raws;
        let reader = scope.spawn(move || read_ahead(names, raws, empty_rx, full_tx));
        let started = Instant::now();
        let mut waited = Duration::ZERO;
        let uploaded = (|| -> anyhow::Result<()> {
            for (name, raw) in names.iter().zip(raws) {
                let asked = Instant::now();
                let buffer = full_rx
                    .recv()
                    .map_err(|_| anyhow::anyhow!("the staging reader stopped before {name}"))?;
                waited += asked.elapsed();
                let values = upload_staged(gpu, name, raw, &buffer)?;
                // The copy out of `buffer` is queued; it must finish before
                // the reader refills the buffer.
                let copied = gpu
                    .stream()
                    .record_event(None)
                    .during(format!("marking the upload of {name}"))?;
                consume(name, values, raw.shape.clone())?;
                copied
                    .synchronize()
                    .during(format!("waiting for the upload of {name}"))?;
                // The reader has stopped when there is no receiver left; its
                // own result says why.
                let _ = empty_tx.send(buffer);
            }
            Ok(())
        })();
        // Unblocks the reader if consumption stopped early.
        drop(full_rx);
        drop(empty_tx);
        let read = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the staging reader panicked"))?;
        uploaded?;
        read?;
        // Where the time went: waiting on the reader means the disk or the
        // page cache is the bound, the rest is the device and the downloads.
        tracing::info!(
            tensors = raws.len(),
            bytes = raws.iter().map(|raw| raw.bytes.len()).sum::<usize>(),
            seconds = started.elapsed().as_secs_f64(),
            waiting_for_reads_s = waited.as_secs_f64(),
            "staged uploads"
        );
        Ok(())
    })
}

/// The reader thread: fills each free buffer with the next tensor's bytes.
fn read_ahead(
    names: &[String],
    raws: &[RawTensor<'_>],
    empty: mpsc::Receiver<PinnedHostSlice<u8>>,
    full: mpsc::SyncSender<PinnedHostSlice<u8>>,
) -> anyhow::Result<()> {
    for (name, raw) in names.iter().zip(raws) {
        // No buffer back, or no one to take this one: the uploader stopped.
        let Ok(mut buffer) = empty.recv() else {
            return Ok(());
        };
        let dst = buffer
            .as_mut_slice()
            .during("opening a page-locked staging buffer")?;
        dst[..raw.bytes.len()]
            .par_chunks_mut(COPY_CHUNK)
            .enumerate()
            .try_for_each(|(i, chunk)| raw.read_at(chunk, i * COPY_CHUNK))
            .with_context(|| format!("reading {name} from {}", raw.file))?;
        if full.send(buffer).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Queues the copy of `raw`'s staged bytes and widens them to f32.
fn upload_staged(
    gpu: &Gpu,
    name: &str,
    raw: &RawTensor<'_>,
    buffer: &PinnedHostSlice<u8>,
) -> Result<CudaSlice<f32>, UploadError> {
    let n = raw.bytes.len();
    let stream = gpu.stream();
    let host = buffer
        .as_slice()
        .during("reading a page-locked staging buffer")?;
    let mut bytes = gpu.buffer_to_fill::<u8>(n, name)?;
    stream
        .memcpy_htod(&host[..n], &mut bytes)
        .during(format!("uploading {name}"))?;
    Ok(widen(gpu, name, raw.dtype, &bytes, n / 2)?)
}

/// Page-locked memory that results come back through, grown to the largest
/// asked for. A download into pageable memory is staged by the driver on
/// one thread and faults every fresh page of the result in on the way (the
/// codes of an 8B model are 7 GB); here the copy lands in page-locked
/// memory and is copied into the result on the rayon pool.
#[derive(Default)]
pub struct Downloads {
    buffer: RefCell<Option<PinnedHostSlice<u8>>>,
}

impl Downloads {
    /// The bytes of `src`, each passed through `convert`.
    pub fn bytes<T>(
        &self,
        gpu: &Gpu,
        src: &CudaView<'_, u8>,
        convert: impl Fn(u8) -> T + Sync,
    ) -> Result<Vec<T>, GpuError>
    where
        T: Default + Clone + Send,
    {
        let n = src.len();
        let mut slot = self.buffer.borrow_mut();
        // Taken out while in use; the old buffer is freed before a larger one is taken.
        let mut buffer = match slot.take() {
            Some(buffer) if buffer.len() >= n => buffer,
            _ => {
                // SAFETY: the buffer is written by the copy before it is read.
                unsafe { gpu.context().alloc_pinned_with_flags::<u8>(n, 0) }
                    .during("allocating a page-locked download buffer")?
            }
        };
        let host = buffer
            .as_mut_slice()
            .during("opening the page-locked download buffer")?;
        gpu.stream()
            .memcpy_dtoh(src, &mut host[..n])
            .during("downloading a result")?;
        gpu.synchronize()?;
        let mut out = vec![T::default(); n];
        out.par_chunks_mut(COPY_CHUNK)
            .zip(host[..n].par_chunks(COPY_CHUNK))
            .for_each(|(dst, src)| {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = convert(*s);
                }
            });
        *slot = Some(buffer);
        Ok(out)
    }
}
