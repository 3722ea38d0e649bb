//! Latency distributions: mean and nearest-rank percentiles, the way
//! load-test reports (vLLM's benchmark_serving, guidellm) state them.

use serde::{Deserialize, Serialize};

/// Summary of a set of samples, in seconds. All zero when there are none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// Number of samples.
    pub count: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

impl Distribution {
    /// Summarises `samples` (NaNs are dropped).
    pub fn of(samples: &[f64]) -> Distribution {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        if sorted.is_empty() {
            return Distribution::default();
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        Distribution {
            count: n,
            mean: sorted.iter().sum::<f64>() / n as f64,
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[n - 1],
        }
    }
}

/// Nearest-rank percentile of sorted, non-empty samples: the smallest
/// sample with at least `p` % of the samples at or below it.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let d = Distribution::of(&samples);
        assert_eq!(d.count, 100);
        assert_eq!(d.p50, 50.0);
        assert_eq!(d.p90, 90.0);
        assert_eq!(d.p99, 99.0);
        assert_eq!(d.max, 100.0);
        assert!((d.mean - 50.5).abs() < 1e-12);
        let one = Distribution::of(&[0.25]);
        assert_eq!((one.p50, one.p99, one.max), (0.25, 0.25, 0.25));
        assert_eq!(Distribution::of(&[]), Distribution::default());
    }
}
