//! `quantizer-job gpu-check`: the GPU backend against its CPU twin, on the
//! bundled model and on random Linears of Llama-3-8B's shapes, with both
//! timed. Run on a GPU machine by `quantizer-job/bench/gpu/check.sh`; the
//! printed table and the JSON file are what docs/performance.md records.
//!
//! What must hold: RTN, INT8 and FP8 codes and scales identical to the CPU's;
//! GPTQ's layer output error within a small relative bound of the CPU's and
//! its dequantized weights close to the CPU's (the two accumulate rounding in
//! different orders, so codes near a rounding boundary may differ); AWQ's
//! chosen α and scales identical, its search error within 0.1%.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::error::DriverContext;
use super::{CudaBackend, DeviceQuantizer, Gpu};
use crate::checkpoint::Checkpoint;
use crate::quant::{
    ActOrder, AwqConfig, CpuBackend, FloatDtype, Hessian, IntScheme, Matrix, QuantBackend,
    QuantizedLinear, output_error,
};

/// Arguments of `gpu-check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The bundled model's directory (Hugging Face layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Timed repetitions of each GPU kernel (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub reps: usize,
    /// Activation rows of the random GPTQ inputs.
    #[arg(long, default_value_t = 4096)]
    pub samples: usize,
    /// Skip the CPU GPTQ of the 8B shapes (minutes on few cores).
    #[arg(long)]
    pub skip_cpu_gptq: bool,
    /// Where to write every figure as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One compared operation.
#[derive(Debug, Serialize)]
pub struct CheckRow {
    pub case: String,
    pub shape: [usize; 2],
    pub cpu_ms: Option<f64>,
    pub gpu_ms: f64,
    /// Bytes the kernel must move over its median time, GB/s.
    pub gpu_gbps: Option<f64>,
    /// Share of codes that differ from the CPU's.
    pub code_mismatch: f64,
    /// Largest relative difference of a scale.
    pub scale_max_rel: f64,
    /// `‖Ŵ_gpu − Ŵ_cpu‖ / ‖W‖`.
    pub weight_rel: f64,
    /// GPTQ: output error GPU / output error CPU.
    pub output_error_ratio: Option<f64>,
    pub pass: bool,
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub device: String,
    pub copy_gbps: f64,
    pub rows: Vec<CheckRow>,
}

const LLAMA3_8B: [(&str, [usize; 2]); 4] = [
    ("q_proj", [4096, 4096]),
    ("k_proj", [1024, 4096]),
    ("gate_proj", [14336, 4096]),
    ("down_proj", [4096, 14336]),
];

/// Runs every check, prints the table and fails when one does not pass.
pub fn run(args: &CheckArgs) -> anyhow::Result<()> {
    let gpu = Gpu::open(0).context("gpu-check needs a GPU")?;
    let backend = CudaBackend::new(&gpu)?;
    let q = backend.quantizer();
    let copy_gbps = copy_bandwidth(&gpu, args.reps)?;
    println!(
        "device {} — copy bandwidth {copy_gbps:.0} GB/s (read + write)",
        gpu.name()
    );
    let mut rows = Vec::new();
    let mut rng = StdRng::seed_from_u64(7);

    // Random Llama-3-8B Linears: RTN, INT8, FP8.
    for (name, shape) in LLAMA3_8B {
        let w = random_weight(&mut rng, shape);
        for (case, scheme) in weight_only_schemes() {
            rows.push(compare_weight_only(
                q,
                &format!("{case} {name}"),
                &w,
                scheme,
                args.reps,
            )?);
        }
    }
    // GPTQ on random Llama-3-8B Linears with correlated inputs.
    for (name, shape) in LLAMA3_8B {
        let x = random_activations(&mut rng, args.samples, shape[1]);
        let w = random_weight(&mut rng, shape);
        let cpu = !(args.skip_cpu_gptq || shape[1] > 4096);
        rows.push(compare_gptq(
            &backend,
            &format!("gptq-w4g128 {name}"),
            &w,
            &x,
            cpu,
        )?);
    }
    // AWQ on random Llama-3-8B Linear sets: the attention inputs (q, k, v;
    // no clipping for q and k) and down_proj (clipped).
    let x = random_activations(&mut rng, 512, 4096);
    let qkv = [[4096, 4096], [1024, 4096], [1024, 4096]].map(|s| random_weight(&mut rng, s));
    rows.push(compare_awq(
        &backend,
        "awq-w4g128 q,k,v_proj",
        &["q_proj", "k_proj", "v_proj"],
        &qkv,
        &x,
    )?);
    let x = random_activations(&mut rng, 512, 14336);
    let down = [random_weight(&mut rng, [4096, 14336])];
    rows.push(compare_awq(
        &backend,
        "awq-w4g128 down_proj",
        &["down_proj"],
        &down,
        &x,
    )?);
    // The bundled model's own Linears.
    let checkpoint = Checkpoint::open(&args.model)
        .with_context(|| format!("--model {}", args.model.display()))?;
    let mut hessian_rng = StdRng::seed_from_u64(11);
    for name in checkpoint.tensor_names() {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if !module.contains(".layers.0.") && !module.contains(".layers.5.") {
            continue;
        }
        if !(module.ends_with("_proj")) {
            continue;
        }
        let t = checkpoint.load_f32(name)?;
        let (r, c) = t.dims2()?;
        let w = Matrix::new(r, c, t.flatten_all()?.to_vec1::<f32>()?)?;
        for (case, scheme) in weight_only_schemes() {
            rows.push(compare_weight_only(
                q,
                &format!("{case} {module}"),
                &w,
                scheme,
                3,
            )?);
        }
        let x = random_activations(&mut hessian_rng, 2048, c);
        rows.push(compare_gptq(
            &backend,
            &format!("gptq-w4g128 {module}"),
            &w,
            &x,
            true,
        )?);
        let case = format!("awq-w4g128 {module}");
        rows.push(compare_awq(&backend, &case, &[module], &[w], &x)?);
    }
    // The Llama forward pass: logits of the bundled model on the GPU against
    // the CPU's (f32 both; summation order differs).
    let vocab = checkpoint.config().vocab_size as u32;
    let tokens: Vec<u32> = (0..256u32).map(|i| (i * 37 + 11) % vocab).collect();
    let t = Instant::now();
    let rel = super::llama::check_forward(&gpu, &checkpoint, &tokens)?;
    rows.push(CheckRow {
        case: "forward logits (256 tokens)".to_string(),
        shape: [tokens.len(), vocab as usize],
        cpu_ms: None,
        gpu_ms: t.elapsed().as_secs_f64() * 1e3,
        gpu_gbps: None,
        code_mismatch: 0.0,
        scale_max_rel: 0.0,
        weight_rel: f64::from(rel),
        output_error_ratio: None,
        pass: rel < 1e-4,
    });
    let report = CheckReport {
        device: gpu.name().to_string(),
        copy_gbps,
        rows,
    };
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed: Vec<&str> = report
        .rows
        .iter()
        .filter(|r| !r.pass)
        .map(|r| r.case.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("GPU and CPU disagree on: {}", failed.join(", "));
    }
    Ok(())
}

/// The weight-only schemes: name and (integer scheme or FP8).
fn weight_only_schemes() -> [(&'static str, Option<IntScheme>); 3] {
    let int = |bits, symmetric, group_size| {
        Some(IntScheme {
            bits,
            symmetric,
            group_size,
            scale_dtype: FloatDtype::F16,
        })
    };
    [
        ("rtn-w4g128-asym", int(4, false, Some(128))),
        ("int8-channel", int(8, true, None)),
        ("fp8-channel", None),
    ]
}

/// Normal-ish weights with a few outliers, as trained Linears have.
fn random_weight(rng: &mut StdRng, [rows, cols]: [usize; 2]) -> Matrix {
    let data = (0..rows * cols)
        .map(|_| {
            let v: f32 = (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 0.05;
            if rng.random::<f32>() < 1e-4 {
                v * 20.0
            } else {
                v
            }
        })
        .collect();
    Matrix { rows, cols, data }
}

/// Inputs with correlated channels and uneven scales, so the Hessian is far
/// from diagonal and GPTQ's compensation matters.
fn random_activations(rng: &mut StdRng, rows: usize, cols: usize) -> Matrix {
    let channel_scale: Vec<f32> = (0..cols).map(|_| 0.2 + 2.0 * rng.random::<f32>()).collect();
    let mut data = vec![0.0f32; rows * cols];
    for r in 0..rows {
        let common: f32 = rng.random::<f32>() - 0.5;
        for c in 0..cols {
            let own: f32 = rng.random::<f32>() - 0.5;
            data[r * cols + c] = (own + 0.5 * common) * channel_scale[c];
        }
    }
    Matrix { rows, cols, data }
}

/// Device-to-device copy of 1 GiB, GB/s counting bytes read and written,
/// timed like the kernels: `reps` copies back to back after a warm-up.
fn copy_bandwidth(gpu: &Gpu, reps: usize) -> anyhow::Result<f64> {
    let n = 1usize << 28; // 2^28 f32 = 1 GiB
    let stream = gpu.stream();
    let src = stream
        .alloc_zeros::<f32>(n)
        .during("allocating the copy source")?;
    let mut dst = stream
        .alloc_zeros::<f32>(n)
        .during("allocating the copy target")?;
    stream.memcpy_dtod(&src, &mut dst).during("copying")?;
    gpu.synchronize()?;
    let t = Instant::now();
    for _ in 0..reps.max(1) {
        stream.memcpy_dtod(&src, &mut dst).during("copying")?;
    }
    gpu.synchronize()?;
    let per_copy = t.elapsed().as_secs_f64() / reps.max(1) as f64;
    Ok(2.0 * (n * 4) as f64 / per_copy / 1e9)
}

fn compare_weight_only(
    q: &DeviceQuantizer,
    case: &str,
    w: &Matrix,
    scheme: Option<IntScheme>,
    reps: usize,
) -> anyhow::Result<CheckRow> {
    let gpu = q.gpu();
    let shape = [w.rows, w.cols];
    let dev_w = gpu.stream().clone_htod(&w.data).during("uploading")?;
    let t = Instant::now();
    let cpu = match scheme {
        Some(s) => CpuBackend.quantize_rtn(case, w, s)?,
        None => CpuBackend.quantize_fp8(case, w, FloatDtype::F16)?,
    };
    let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
    let out = match scheme {
        Some(s) => q.rtn(case, &dev_w, shape, s)?,
        None => q.fp8(case, &dev_w, shape, FloatDtype::F16)?,
    };
    let gpu_linear = out.linear;
    let kernel_s = q.time_weight_only(&dev_w, shape, scheme, reps.max(3))?;
    // Read 4 B per weight, write 1 B code + 4 B dequantized weight.
    let bytes = (w.rows * w.cols) as f64 * 9.0;
    let row = compare_results(case, shape, &cpu, &gpu_linear, w);
    Ok(CheckRow {
        cpu_ms: Some(cpu_ms),
        gpu_ms: kernel_s * 1e3,
        gpu_gbps: Some(bytes / kernel_s / 1e9),
        pass: row.code_mismatch == 0.0 && row.scale_max_rel == 0.0,
        ..row
    })
}

fn compare_gptq(
    backend: &CudaBackend,
    case: &str,
    w: &Matrix,
    x: &Matrix,
    with_cpu: bool,
) -> anyhow::Result<CheckRow> {
    let scheme = IntScheme {
        bits: 4,
        symmetric: false,
        group_size: Some(128),
        scale_dtype: FloatDtype::F16,
    };
    let mut h = Hessian::new(case, x.cols);
    CpuBackend.accumulate_hessian(&mut h, x)?;
    let gpu = backend.quantizer().gpu();
    gpu.synchronize()?;
    let t = Instant::now();
    let g = backend.quantize_gptq(case, w, &h, scheme, ActOrder::Static, 0.01)?;
    gpu.synchronize()?;
    let gpu_ms = t.elapsed().as_secs_f64() * 1e3;
    let rtn = CpuBackend.quantize_rtn(case, w, scheme)?;
    let err_gpu = output_error(x, w, &g.dequantized)?;
    let err_rtn = output_error(x, w, &rtn.dequantized)?;
    if !with_cpu {
        // No CPU twin for this shape: GPTQ must at least beat RTN clearly.
        let ratio = err_gpu / err_rtn;
        return Ok(CheckRow {
            case: format!("{case} (vs rtn)"),
            shape: [w.rows, w.cols],
            cpu_ms: None,
            gpu_ms,
            gpu_gbps: None,
            code_mismatch: f64::NAN,
            scale_max_rel: f64::NAN,
            weight_rel: f64::NAN,
            output_error_ratio: Some(ratio),
            pass: ratio < 0.9,
        });
    }
    let t = Instant::now();
    let c = CpuBackend.quantize_gptq(case, w, &h, scheme, ActOrder::Static, 0.01)?;
    let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
    let err_cpu = output_error(x, w, &c.dequantized)?;
    let row = compare_results(case, [w.rows, w.cols], &c, &g, w);
    let ratio = err_gpu / err_cpu;
    Ok(CheckRow {
        cpu_ms: Some(cpu_ms),
        gpu_ms,
        output_error_ratio: Some(ratio),
        // Same algorithm, different summation order: the output error within
        // 2% of the CPU's, few codes off by one, scales (static grids) equal.
        pass: (ratio - 1.0).abs() < 0.02 && row.code_mismatch < 0.02 && err_gpu < err_rtn,
        ..row
    })
}

fn compare_awq(
    backend: &CudaBackend,
    case: &str,
    names: &[&str],
    weights: &[Matrix],
    x: &Matrix,
) -> anyhow::Result<CheckRow> {
    let scheme = IntScheme {
        bits: 4,
        symmetric: false,
        group_size: Some(128),
        scale_dtype: FloatDtype::F16,
    };
    let layers: Vec<(&str, &Matrix)> = names.iter().copied().zip(weights).collect();
    let config = AwqConfig::default();
    let gpu = backend.quantizer().gpu();
    gpu.synchronize()?;
    let t = Instant::now();
    let g = backend.quantize_awq(&layers, x, scheme, &config)?;
    gpu.synchronize()?;
    let gpu_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let c = CpuBackend.quantize_awq(&layers, x, scheme, &config)?;
    let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
    // Codes, grids and weights over the whole set, as one row.
    let mut mismatch = 0.0;
    let mut scale_max_rel = 0.0f64;
    let mut weight_rel = 0.0f64;
    let total: usize = weights.iter().map(|w| w.rows * w.cols).sum();
    for ((cl, gl), w) in c.layers.iter().zip(&g.layers).zip(weights) {
        let row = compare_results(case, cl.shape, cl, gl, w);
        mismatch += row.code_mismatch * (w.rows * w.cols) as f64 / total as f64;
        scale_max_rel = scale_max_rel.max(row.scale_max_rel);
        weight_rel = weight_rel.max(row.weight_rel);
    }
    let same_scales = c.alpha == g.alpha && c.scales == g.scales;
    let ratio = g.search_error / c.search_error;
    Ok(CheckRow {
        case: format!("{case} (α {:?})", g.alpha),
        shape: [weights.iter().map(|w| w.rows).sum(), x.cols],
        cpu_ms: Some(cpu_ms),
        gpu_ms,
        gpu_gbps: None,
        code_mismatch: mismatch,
        scale_max_rel,
        weight_rel,
        output_error_ratio: Some(ratio),
        // The same α and bit-identical scales; the search error within 0.1%
        // (summation order); few codes off where a clip ratio tied.
        pass: same_scales && (ratio - 1.0).abs() < 1e-3 && mismatch < 0.02,
    })
}

fn compare_results(
    case: &str,
    shape: [usize; 2],
    cpu: &QuantizedLinear,
    gpu: &QuantizedLinear,
    w: &Matrix,
) -> CheckRow {
    let mismatch = cpu.codes_differing(gpu).unwrap_or(usize::MAX);
    let total = (shape[0] * shape[1]).max(1);
    let scale_max_rel = cpu
        .scales
        .data
        .iter()
        .zip(&gpu.scales.data)
        .map(|(a, b)| f64::from((a - b).abs() / a.abs().max(f32::MIN_POSITIVE)))
        .fold(0.0, f64::max);
    let diff: f64 = cpu
        .dequantized
        .data
        .iter()
        .zip(&gpu.dequantized.data)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    let norm: f64 = w.data.iter().map(|v| f64::from(*v).powi(2)).sum();
    CheckRow {
        case: case.to_string(),
        shape,
        cpu_ms: None,
        gpu_ms: 0.0,
        gpu_gbps: None,
        code_mismatch: mismatch as f64 / total as f64,
        scale_max_rel,
        weight_rel: (diff / norm.max(f64::MIN_POSITIVE)).sqrt(),
        output_error_ratio: None,
        pass: false,
    }
}

fn print_table(report: &CheckReport) {
    println!(
        "{:<42} {:>13} {:>10} {:>10} {:>8} {:>9} {:>9} {:>9} {:>6}",
        "case", "shape", "cpu ms", "gpu ms", "GB/s", "codes≠", "Ŵ rel", "err g/c", "pass"
    );
    for r in &report.rows {
        println!(
            "{:<42} {:>13} {:>10} {:>10.3} {:>8} {:>9.2e} {:>9.2e} {:>9} {:>6}",
            r.case,
            format!("{}x{}", r.shape[0], r.shape[1]),
            r.cpu_ms.map_or("-".to_string(), |v| format!("{v:.1}")),
            r.gpu_ms,
            r.gpu_gbps.map_or("-".to_string(), |v| format!("{v:.0}")),
            r.code_mismatch,
            r.weight_rel,
            r.output_error_ratio
                .map_or("-".to_string(), |v| format!("{v:.4}")),
            if r.pass { "ok" } else { "FAIL" }
        );
    }
}
