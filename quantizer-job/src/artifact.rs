//! Facts about a written artifact that the operator records and the GitOps
//! commit names: a digest over its weight files and its size.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use thiserror::Error;

/// Reading the artifact failed.
#[derive(Debug, Error)]
#[error("cannot read artifact file {path}: {source}")]
pub struct ArtifactError {
    pub path: String,
    pub source: std::io::Error,
}

/// The weight files of an artifact: `*.safetensors`, in name order.
fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, ArtifactError> {
    let io = |source| ArtifactError {
        path: dir.display().to_string(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// `sha256:<hex>` over the weight files' names and bytes in name order, and
/// their total size: identical weights give an identical digest wherever the
/// artifact is copied.
pub fn weights_digest(dir: &Path) -> Result<(String, u64), ArtifactError> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for path in weight_files(dir)? {
        let io = |source| ArtifactError {
            path: path.display().to_string(),
            source,
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        hasher.update(name.as_bytes());
        hasher.update([0u8]);
        let mut file = std::fs::File::open(&path).map_err(io)?;
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            hasher.update(&buf[..n]);
        }
    }
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_covers_names_and_bytes_of_weights_only() {
        let dir = std::env::temp_dir().join(format!("qo-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("model.safetensors"), b"abc").expect("write");
        std::fs::write(dir.join("README.md"), b"card").expect("write");
        let (d1, size) = weights_digest(&dir).expect("digest");
        assert_eq!(size, 3);
        std::fs::write(dir.join("README.md"), b"other card").expect("write");
        assert_eq!(
            weights_digest(&dir).expect("digest").0,
            d1,
            "the card is not a weight"
        );
        std::fs::write(dir.join("model.safetensors"), b"abd").expect("write");
        assert_ne!(weights_digest(&dir).expect("digest").0, d1);
        std::fs::remove_dir_all(&dir).ok();
    }
}
