//! Opening a Hugging Face-layout checkpoint directory: `config.json` plus one
//! `model.safetensors` or shards listed in `model.safetensors.index.json`.
//!
//! The files are memory-mapped and validated when opened (headers parse,
//! every expected tensor is present with the shape the config implies), so a
//! broken checkpoint fails before any compute is spent on it. Weights are
//! converted to f32 on load because the CPU forward pass and the quantizers
//! work in f32.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{ConfigError, LlamaConfig};

/// Why a checkpoint could not be opened or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// `config.json` is missing, invalid or names an unsupported model.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Neither `model.safetensors` nor an index file exists.
    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// The shard index is unreadable or malformed.
    #[error("invalid shard index {path}: {reason}")]
    InvalidIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file named by the index (or a digest list) does not exist.
    #[error("missing checkpoint file {file} in {dir}")]
    MissingFile {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The missing file's name.
        file: String,
    },
    /// A file exists but cannot be read or mapped.
    #[error("cannot read checkpoint file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A safetensors file is truncated or its header is corrupt.
    #[error("corrupt or truncated safetensors file {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        reason: String,
    },
    /// A tensor the config requires is in none of the files.
    #[error("missing tensor {name} in checkpoint {dir}")]
    MissingTensor {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The tensor's name.
        name: String,
    },
    /// A tensor's shape disagrees with the config.
    #[error("tensor {name} has shape {found:?}, but config.json implies {expected:?}")]
    ShapeMismatch {
        /// The tensor's name.
        name: String,
        /// The shape implied by the config.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype other than F32/F16/BF16.
    #[error("tensor {name} in {file} has unsupported dtype {dtype}; expected F32, F16 or BF16")]
    UnsupportedDtype {
        /// The tensor's name.
        name: String,
        /// The file holding it.
        file: String,
        /// Its dtype.
        dtype: String,
    },
    /// A file's sha256 differs from the expected digest.
    #[error("sha256 mismatch for {file}: expected {expected}, found {found}")]
    DigestMismatch {
        /// The file's name.
        file: String,
        /// The expected hex digest.
        expected: String,
        /// The computed hex digest.
        found: String,
    },
    /// Building a tensor failed.
    #[error("cannot build tensor {name}: {source}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// The candle error.
        source: candle_core::Error,
    },
}

/// Summary figures of a checkpoint, for the report and the model card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// The architecture name from `config.json`.
    pub architecture: String,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of scalar parameters over all tensors in the weight files.
    pub parameters: u64,
    /// Total size of the weight files in bytes.
    pub bytes_on_disk: u64,
    /// The weight files, in load order.
    pub files: Vec<String>,
    /// The dtypes found in the weight files (e.g. `["F16"]`).
    pub dtypes: Vec<String>,
}

/// One memory-mapped safetensors file.
struct WeightFile {
    name: String,
    path: PathBuf,
    /// Kept open for positional reads ([`RawTensor::read_at`]).
    file: File,
    mmap: Mmap,
}

/// Where a tensor lives: which file, its dtype and shape.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
}

/// A tensor as stored: little-endian F32, F16 or BF16 bytes.
pub struct RawTensor<'a> {
    /// The weight file holding it, for messages.
    pub file: &'a str,
    pub bytes: &'a [u8],
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// The open weight file and where `bytes` start in it.
    handle: &'a File,
    offset: u64,
}

impl RawTensor<'_> {
    /// Reads the tensor's bytes `start .. start + dst.len()` from the file
    /// with a positional read. Copying out of the mapping would fault every
    /// page in one at a time under the process's memory-map lock; reads on
    /// several threads fill a staging buffer at the page cache's speed.
    pub fn read_at(&self, dst: &mut [u8], start: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = start
            .checked_add(dst.len())
            .filter(|&end| end <= self.bytes.len());
        if end.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "bytes {start}..+{} are outside the tensor's {}",
                    dst.len(),
                    self.bytes.len()
                ),
            ));
        }
        self.handle.read_exact_at(dst, self.offset + start as u64)
    }
}

/// An opened, validated checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    config: LlamaConfig,
    files: Vec<WeightFile>,
    tensors: BTreeMap<String, TensorEntry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field(
                "files",
                &self.files.iter().map(|w| &w.name).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens `dir`: parses `config.json`, maps every weight file, checks the
    /// headers and that every tensor the config needs is present with the
    /// right shape.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let file_names = weight_file_names(dir)?;
        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = BTreeMap::new();
        for name in file_names {
            let path = dir.join(&name);
            if !path.is_file() {
                return Err(CheckpointError::MissingFile {
                    dir: dir.to_path_buf(),
                    file: name,
                });
            }
            let (file, mmap) = map_file(&path)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| CheckpointError::Corrupt {
                path: path.clone(),
                reason: safetensors_reason(&e),
            })?;
            let index = files.len();
            for (tensor_name, view) in st.iter() {
                tensors.insert(
                    tensor_name.to_string(),
                    TensorEntry {
                        file: index,
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                    },
                );
            }
            drop(st);
            files.push(WeightFile {
                name,
                path,
                file,
                mmap,
            });
        }
        let checkpoint = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            files,
            tensors,
        };
        checkpoint.validate_tensors()?;
        tracing::info!(
            dir = %dir.display(),
            files = checkpoint.files.len(),
            tensors = checkpoint.tensors.len(),
            "opened checkpoint"
        );
        Ok(checkpoint)
    }

    fn validate_tensors(&self) -> Result<(), CheckpointError> {
        for (name, expected) in self.config.expected_tensors() {
            let entry = self
                .tensors
                .get(&name)
                .ok_or_else(|| CheckpointError::MissingTensor {
                    dir: self.dir.clone(),
                    name: name.clone(),
                })?;
            if entry.shape != expected {
                return Err(CheckpointError::ShapeMismatch {
                    name,
                    expected,
                    found: entry.shape.clone(),
                });
            }
            if !matches!(entry.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(CheckpointError::UnsupportedDtype {
                    name,
                    file: self.files[entry.file].name.clone(),
                    dtype: format!("{:?}", entry.dtype),
                });
            }
        }
        Ok(())
    }

    /// The parsed model configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Summary figures: parameter count, bytes on disk, architecture, layers.
    pub fn info(&self) -> CheckpointInfo {
        let parameters = self
            .tensors
            .values()
            .map(|e| e.shape.iter().product::<usize>() as u64)
            .sum();
        let bytes_on_disk = self.files.iter().map(|f| f.mmap.len() as u64).sum();
        let mut dtypes: Vec<String> = self
            .tensors
            .values()
            .map(|e| format!("{:?}", e.dtype))
            .collect();
        dtypes.sort();
        dtypes.dedup();
        CheckpointInfo {
            architecture: self.config.architecture.hf_name().to_string(),
            num_layers: self.config.num_hidden_layers,
            hidden_size: self.config.hidden_size,
            vocab_size: self.config.vocab_size,
            parameters,
            bytes_on_disk,
            files: self.files.iter().map(|f| f.name.clone()).collect(),
            dtypes,
        }
    }

    /// Checks the sha256 of each named file against its expected hex digest.
    pub fn verify_digests(
        &self,
        digests: &BTreeMap<String, String>,
    ) -> Result<(), CheckpointError> {
        for (file, expected) in digests {
            let path = self.dir.join(file);
            let bytes = std::fs::read(&path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    CheckpointError::MissingFile {
                        dir: self.dir.clone(),
                        file: file.clone(),
                    }
                } else {
                    CheckpointError::Io {
                        path: path.clone(),
                        source,
                    }
                }
            })?;
            let found = hex::encode(Sha256::digest(&bytes));
            if !found.eq_ignore_ascii_case(expected) {
                return Err(CheckpointError::DigestMismatch {
                    file: file.clone(),
                    expected: expected.clone(),
                    found,
                });
            }
        }
        Ok(())
    }

    /// Names of every tensor in the weight files.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// One tensor's stored bytes, dtype and shape, borrowed from the mapped
    /// file: what the GPU path uploads as is and widens on the device. A
    /// Linear the family stores fused ([`crate::family::Fused`], Phi-3's
    /// `qkv_proj`) is served under its split name too, as its rows of the
    /// fused tensor: contiguous bytes of the row-major matrix, so every
    /// reader (CPU loader, GPU upload, staging) sees the split Linears.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>, CheckpointError> {
        if !self.tensors.contains_key(name)
            && let Some((fused, rows)) = self.config.fused_part(name)
        {
            let whole = self.raw(&fused)?;
            let cols = whole.shape.get(1).copied().unwrap_or(0);
            let width = cols * whole.dtype.bitsize() / 8;
            let bytes = whole
                .bytes
                .get(rows.start * width..rows.end * width)
                .ok_or_else(|| CheckpointError::ShapeMismatch {
                    name: fused.clone(),
                    expected: vec![rows.end, cols],
                    found: whole.shape.clone(),
                })?;
            return Ok(RawTensor {
                bytes,
                shape: vec![rows.len(), cols],
                offset: whole.offset + (rows.start * width) as u64,
                ..whole
            });
        }
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                dir: self.dir.clone(),
                name: name.to_string(),
            })?;
        let file = &self.files[entry.file];
        let st = SafeTensors::deserialize(&file.mmap).map_err(|e| CheckpointError::Corrupt {
            path: file.path.clone(),
            reason: safetensors_reason(&e),
        })?;
        let view = st.tensor(name).map_err(|e| CheckpointError::Corrupt {
            path: file.path.clone(),
            reason: safetensors_reason(&e),
        })?;
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(CheckpointError::UnsupportedDtype {
                name: name.to_string(),
                file: file.name.clone(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        let bytes = view.data();
        Ok(RawTensor {
            file: &file.name,
            bytes,
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            handle: &file.file,
            // Both point into the same mapping.
            offset: (bytes.as_ptr() as usize - file.mmap.as_ptr() as usize) as u64,
        })
    }

    /// Loads one tensor, converted to f32.
    pub fn load_f32(&self, name: &str) -> Result<Tensor, CheckpointError> {
        let raw = self.raw(name)?;
        let values = bytes_to_f32(raw.bytes, raw.dtype).ok_or_else(|| {
            CheckpointError::UnsupportedDtype {
                name: name.to_string(),
                file: raw.file.to_string(),
                dtype: format!("{:?}", raw.dtype),
            }
        })?;
        Tensor::from_vec(values, raw.shape, &Device::Cpu).map_err(|source| {
            CheckpointError::Tensor {
                name: name.to_string(),
                source,
            }
        })
    }

    /// Loads every tensor the forward pass needs, as f32, keyed by its
    /// Hugging Face name. This is the weight source of
    /// [`crate::model::LlamaModel::from_tensors`]; a compressed-tensors reader
    /// can supply the same map with dequantized linears instead.
    pub fn load_all_f32(&self) -> Result<HashMap<String, Tensor>, CheckpointError> {
        self.config
            .expected_tensors()
            .into_iter()
            .map(|(name, _)| {
                let tensor = self.load_f32(&name)?;
                Ok((name, tensor))
            })
            .collect()
    }
}

fn weight_file_names(dir: &Path) -> Result<Vec<String>, CheckpointError> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path).map_err(|source| CheckpointError::Io {
            path: index_path.clone(),
            source,
        })?;
        let index: ShardIndex =
            serde_json::from_str(&text).map_err(|e| CheckpointError::InvalidIndex {
                path: index_path.clone(),
                reason: crate::content_free::json(&e),
            })?;
        let mut names: Vec<String> = index.weight_map.into_values().collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(CheckpointError::InvalidIndex {
                path: index_path,
                reason: "weight_map is empty".into(),
            });
        }
        if names.iter().any(|n| n.contains('/') || n.contains("..")) {
            return Err(CheckpointError::InvalidIndex {
                path: index_path.clone(),
                reason: "weight_map names a shard that is not a plain file name".into(),
            });
        }
        return Ok(names);
    }
    if dir.join(SINGLE_FILE).is_file() {
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    Err(CheckpointError::NoWeights {
        dir: dir.to_path_buf(),
    })
}

/// What is wrong with a safetensors file, without its header's text (the
/// JSON errors of a header that is not JSON would quote it).
fn safetensors_reason(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::InvalidHeaderDeserialization(json) | E::JsonError(json) => {
            format!(
                "invalid JSON in header: {}",
                crate::content_free::json(json)
            )
        }
        E::InvalidHeader(_) => "invalid UTF-8 in header".to_string(),
        E::TensorNotFound(_) => "a tensor the index names is not in the file".to_string(),
        E::InvalidOffset(_) => "a tensor's offsets are invalid".to_string(),
        other => other.to_string(),
    }
}

/// Opens and maps a weight file; the file stays open for positional reads.
fn map_file(path: &Path) -> Result<(File, Mmap), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len < 8 {
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("file is {len} bytes, shorter than the 8-byte header length"),
        });
    }
    // SAFETY: the checkpoint files are treated as read-only inputs; the
    // worker does not modify them while mapped.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
    Ok((file, mmap))
}

/// Converts little-endian raw tensor bytes to f32; `None` for other dtypes.
/// Parallel: for a multi-billion-parameter checkpoint this conversion is
/// what the GPU pipeline waits on between layers.
fn bytes_to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    match dtype {
        Dtype::F32 => Some(
            bytes
                .par_chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .par_chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            bytes
                .par_chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}
