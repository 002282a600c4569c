//! The run's learning curves: `metrics.csv` in the run folder, one row per epoch, appended as
//! epochs finish so an interrupted or resumed run keeps one continuous file.

use crate::loss::Stats;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Tensor;

const HEADER: &str = "epoch,step,train_loss,train_reconstruction,train_kl,test_loss,test_reconstruction,\
test_kl,active_dims,lr,images_per_s,seconds";

/// The header for `row`: [`HEADER`], then `train_<name>` for each sharpness statistic a run
/// with a perceptual or adversarial term logs.
fn header(row: &EpochRow) -> String {
    let mut header = HEADER.to_string();
    for (name, _) in row.train.sharpness_named() {
        header.push_str(",train_");
        header.push_str(name);
    }
    header
}

/// Posterior means vary across the data by more than this in an active latent dimension
/// (Burda et al. 2016): below it, the dimension ignores its input.
pub const ACTIVE_THRESHOLD: f64 = 0.01;

/// Latent dimensions whose posterior mean varies across the `n` images, from the means'
/// per-dimension sums and sums of squares (`[2, D]`): the unbiased variance above the threshold.
pub fn active_dimensions(moments: &Tensor, n: usize) -> i64 {
    if n < 2 {
        return 0;
    }
    let (sum, square) =
        (moments.get(0).to_kind(tch::Kind::Double), moments.get(1).to_kind(tch::Kind::Double));
    let variance = (square - sum.square() / n as f64) / (n - 1) as f64;
    variance.gt(ACTIVE_THRESHOLD).sum(tch::Kind::Int64).int64_value(&[])
}

/// One epoch's row.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRow {
    pub epoch: u64,
    pub step: u64,
    pub train: Stats,
    pub test: Stats,
    pub active_dims: i64,
    pub lr: f64,
    pub images_per_s: f64,
    pub seconds: f64,
}

pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// The log at `path` (a run folder's `metrics.csv`).
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf() }
    }

    /// Appends a row, writing the header first into a new file. Rows of epochs at or after
    /// `row.epoch` (left by a run resumed from an earlier checkpoint) are dropped first, so
    /// the file always describes the run that leads to the latest checkpoint. A row with
    /// other columns (a resume that turned a term on or off) rewrites the header; earlier
    /// rows keep their values.
    pub fn append(&self, row: &EpochRow) -> Result<()> {
        let context = || format!("writing {}", self.path.display());
        let existing = std::fs::read_to_string(&self.path).unwrap_or_default();
        let kept: Vec<&str> = existing
            .lines()
            .skip(1)
            .filter(|l| {
                l.split(',').next().and_then(|e| e.parse::<u64>().ok()).is_some_and(|e| e < row.epoch)
            })
            .collect();
        let header = header(row);
        let rewrite =
            existing.lines().next() != Some(header.as_str()) || kept.len() + 1 != existing.lines().count();
        let mut line = format!(
            "{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{},{},{:.1},{:.2}\n",
            row.epoch,
            row.step,
            row.train.loss,
            row.train.reconstruction,
            row.train.kl,
            row.test.loss,
            row.test.reconstruction,
            row.test.kl,
            row.active_dims,
            row.lr,
            row.images_per_s,
            row.seconds
        );
        for (_, value) in row.train.sharpness_named() {
            line.insert_str(line.len() - 1, &format!(",{value:.4}"));
        }
        if rewrite {
            let mut text = format!("{header}\n");
            for l in kept {
                text.push_str(l);
                text.push('\n');
            }
            text.push_str(&line);
            crate::fsio::write_atomic(&self.path, text.as_bytes()).with_context(context)
        } else {
            let mut file = std::fs::OpenOptions::new().append(true).open(&self.path).with_context(context)?;
            file.write_all(line.as_bytes()).with_context(context)
        }
    }

    /// The rows as (header, values) pairs per epoch, for plots and tests.
    pub fn read(&self) -> Result<Vec<Vec<(String, f64)>>> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
        lines
            .map(|l| {
                l.split(',')
                    .zip(&header)
                    .map(|(v, h)| {
                        let value =
                            v.parse().with_context(|| format!("{}: {h} = {v:?}", self.path.display()))?;
                        Ok((h.to_string(), value))
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(epoch: u64) -> EpochRow {
        let stats = Stats { loss: 3.0, reconstruction: 2.0, kl: 1.0, sharpness: None };
        EpochRow {
            epoch,
            step: epoch * 10,
            train: stats,
            test: stats,
            active_dims: 4,
            lr: 1e-3,
            images_per_s: 100.0,
            seconds: 1.0,
        }
    }

    #[test]
    fn rows_append_and_a_rerun_epoch_replaces_the_later_rows() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::new(&dir.path().join("metrics.csv"));
        for e in 1..=3 {
            log.append(&row(e)).unwrap();
        }
        // Resumed from epoch 1's checkpoint: epoch 2 is trained again.
        log.append(&row(2)).unwrap();
        let rows = log.read().unwrap();
        let epochs: Vec<f64> = rows.iter().map(|r| r[0].1).collect();
        assert_eq!(epochs, vec![1.0, 2.0]);
        assert_eq!(rows[0].len(), HEADER.split(',').count());
        assert_eq!(rows[1][8], ("active_dims".to_string(), 4.0));
    }

    #[test]
    fn a_run_with_sharpness_terms_logs_them_and_a_change_of_columns_rewrites_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::new(&dir.path().join("metrics.csv"));
        log.append(&row(1)).unwrap();
        let mut gan = row(2);
        gan.train.sharpness = Some([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]);
        log.append(&gan).unwrap();
        let text = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        let header = text.lines().next().unwrap();
        assert!(header.ends_with(",train_lpips,train_g_loss,train_d_weight,train_d_loss,train_logits_real,train_logits_fake,train_logvar"), "{header}");
        let rows = log.read().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].last().unwrap(), &("train_logvar".to_string(), 0.7));
        assert_eq!(rows[0].len(), HEADER.split(',').count(), "the earlier row keeps its values");
    }

    #[test]
    fn only_dimensions_whose_mean_varies_are_active() {
        let varying = Tensor::from_slice(&[-1.0f64, 1.0, -1.0, 1.0]).view([4, 1]);
        let constant = Tensor::from_slice(&[0.3f64, 0.3, 0.31, 0.3]).view([4, 1]);
        let means = Tensor::cat(&[varying, constant], 1);
        let moments = Tensor::stack(
            &[means.sum_dim_intlist(0, false, None), means.square().sum_dim_intlist(0, false, None)],
            0,
        );
        assert_eq!(active_dimensions(&moments, 4), 1);
        // What libtorch's unbiased variance says of the same means.
        assert_eq!(
            means.var_dim(0, true, false).gt(ACTIVE_THRESHOLD).sum(tch::Kind::Int64).int64_value(&[]),
            1
        );
    }
}
