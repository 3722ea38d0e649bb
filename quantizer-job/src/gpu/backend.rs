//! [`QuantBackend`] on the GPU for callers that hold host matrices: each
//! call uploads its inputs, runs the device algorithm and returns the same
//! [`QuantizedLinear`] the CPU twin would, which is how the GPU-vs-CPU check
//! compares them. The GPU pipeline calls [`DeviceQuantizer`] directly and
//! keeps its buffers on the device instead.

use cudarc::driver::CudaSlice;

use super::awq::DeviceAwq;
use super::error::DriverContext;
use super::quant::{DeviceHessian, DeviceQuantizer};
use super::{Gpu, GpuError};
use crate::quant::{
    ActOrder, AwqConfig, AwqResult, FloatDtype, Hessian, IntScheme, Matrix, QuantBackend,
    QuantError, QuantizedLinear,
};

/// The CUDA implementation of [`QuantBackend`].
pub struct CudaBackend<'g> {
    quantizer: DeviceQuantizer<'g>,
}

impl<'g> CudaBackend<'g> {
    /// Loads the kernels of `gpu`.
    pub fn new(gpu: &'g Gpu) -> Result<Self, GpuError> {
        Ok(Self {
            quantizer: DeviceQuantizer::new(gpu)?,
        })
    }

    /// The device algorithms behind this backend.
    pub fn quantizer(&self) -> &DeviceQuantizer<'g> {
        &self.quantizer
    }

    fn upload(&self, w: &Matrix) -> Result<CudaSlice<f32>, GpuError> {
        self.quantizer
            .gpu()
            .stream()
            .clone_htod(&w.data)
            .during("uploading a weight")
    }
}

/// The trait speaks [`QuantError`]; device failures travel as its `Backend` variant.
fn to_quant(e: GpuError) -> QuantError {
    match e {
        GpuError::Quant(q) => q,
        other => QuantError::Backend(other.to_string()),
    }
}

impl QuantBackend for CudaBackend<'_> {
    fn accumulate_hessian(&self, hessian: &mut Hessian, x: &Matrix) -> Result<(), QuantError> {
        if x.cols != hessian.dim() {
            // The CPU accumulator words the shape error; nothing is added.
            return hessian.add_batch(x);
        }
        let gpu = self.quantizer.gpu();
        let gram = (|| -> Result<Vec<f32>, GpuError> {
            let xs = self.upload(x)?;
            let mut h = DeviceHessian::new(gpu, hessian.layer(), hessian.dim())?;
            h.add_batch(gpu, &xs, x.rows)?;
            h.download(gpu)
        })()
        .map_err(to_quant)?;
        hessian.add_gram(&gram, x.rows)
    }

    fn quantize_rtn(
        &self,
        layer: &str,
        w: &Matrix,
        scheme: IntScheme,
    ) -> Result<QuantizedLinear, QuantError> {
        let run = || -> Result<QuantizedLinear, GpuError> {
            let dev = self.upload(w)?;
            Ok(self
                .quantizer
                .rtn(layer, &dev, [w.rows, w.cols], scheme)?
                .linear)
        };
        run().map_err(to_quant)
    }

    fn quantize_gptq(
        &self,
        layer: &str,
        w: &Matrix,
        hessian: &Hessian,
        scheme: IntScheme,
        act_order: ActOrder,
        damp_percent: f64,
    ) -> Result<QuantizedLinear, QuantError> {
        let run = || -> Result<QuantizedLinear, GpuError> {
            let dev = self.upload(w)?;
            Ok(self
                .quantizer
                .gptq_host_hessian(
                    layer,
                    &dev,
                    [w.rows, w.cols],
                    hessian,
                    scheme,
                    act_order,
                    damp_percent,
                )?
                .linear)
        };
        run().map_err(to_quant)
    }

    fn quantize_awq(
        &self,
        layers: &[(&str, &Matrix)],
        x: &Matrix,
        scheme: IntScheme,
        config: &AwqConfig,
    ) -> Result<AwqResult, QuantError> {
        let run = || DeviceAwq::new(&self.quantizer)?.search(layers, x, scheme, config);
        run().map_err(to_quant)
    }

    fn quantize_fp8(
        &self,
        layer: &str,
        w: &Matrix,
        scale_dtype: FloatDtype,
    ) -> Result<QuantizedLinear, QuantError> {
        let run = || -> Result<QuantizedLinear, GpuError> {
            let dev = self.upload(w)?;
            Ok(self
                .quantizer
                .fp8(layer, &dev, [w.rows, w.cols], scale_dtype)?
                .linear)
        };
        run().map_err(to_quant)
    }

    fn dequantize(&self, q: &QuantizedLinear) -> Result<Matrix, QuantError> {
        let run = || -> Result<Matrix, GpuError> {
            let dev = self.quantizer.dequantize(q)?;
            let data = self
                .quantizer
                .gpu()
                .stream()
                .clone_dtoh(&dev)
                .during("downloading the weight")?;
            Ok(Matrix::new(q.shape[0], q.shape[1], data)?)
        };
        run().map_err(to_quant)
    }
}
