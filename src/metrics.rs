//! The run's learning curves: `metrics.csv` in the run folder, one row per test evaluation
//! (each epoch's end, and those inside epochs: `--eval-every-steps`, `--max-steps`), appended
//! as they happen so an interrupted or resumed run keeps one continuous file.

use crate::eval::Quality;
use crate::loss::Stats;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The columns every row has, in order; [`EpochRow::columns`] adds the test split's SSIM and
/// LPIPS where measured and the train split's sharpness statistics where logged.
const HEADER: &str = "epoch,step,train_loss,train_reconstruction,train_kl,test_loss,test_reconstruction,\
test_kl,test_psnr,active_dims,lr,images_per_s,seconds";

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

/// One evaluation's row.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRow {
    /// Epochs trained: whole at an epoch's end, with the fraction trained of the next where
    /// the run evaluated inside it (`--max-steps`, `--eval-every-steps`).
    pub epoch: f64,
    pub step: u64,
    pub train: Stats,
    pub test: Stats,
    /// The test split's reconstructions.
    pub quality: Quality,
    /// Their rFID, in runs given the Inception.
    pub rfid: Option<f64>,
    pub active_dims: i64,
    pub lr: f64,
    pub images_per_s: f64,
    pub seconds: f64,
}

impl EpochRow {
    /// The row's `(column, value)` pairs: [`HEADER`]'s, `test_ssim`, `test_lpips` and
    /// `test_rfid` after `test_psnr` where measured, then `train_<name>` for each sharpness
    /// statistic a run with a perceptual or adversarial term logs.
    fn columns(&self) -> Vec<(String, String)> {
        let q = &self.quality;
        let values = [
            ((self.epoch * 1e4).round() / 1e4).to_string(),
            self.step.to_string(),
            format!("{:.4}", self.train.loss),
            format!("{:.4}", self.train.reconstruction),
            format!("{:.4}", self.train.kl),
            format!("{:.4}", self.test.loss),
            format!("{:.4}", self.test.reconstruction),
            format!("{:.4}", self.test.kl),
            format!("{:.4}", q.psnr_db),
            self.active_dims.to_string(),
            self.lr.to_string(),
            format!("{:.1}", self.images_per_s),
            format!("{:.2}", self.seconds),
        ];
        let mut columns: Vec<(String, String)> = HEADER.split(',').map(String::from).zip(values).collect();
        let at = columns.iter().position(|(c, _)| c == "test_psnr").expect("test_psnr is a column") + 1;
        let measured = [("test_ssim", q.ssim), ("test_lpips", q.lpips), ("test_rfid", self.rfid)];
        let extra = measured.into_iter().filter_map(|(c, v)| Some((c.to_string(), format!("{:.4}", v?))));
        columns.splice(at..at, extra);
        for (name, value) in self.train.sharpness_named() {
            columns.push((format!("train_{name}"), format!("{value:.4}")));
        }
        columns
    }
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
    /// new columns (a resume that turned a term on, a file of an older version) rewrites the
    /// file with them added, each earlier value under its own column's name; a row leaves
    /// empty the columns it lacks (a term turned off): no figure is lost or misplaced.
    pub fn append(&self, row: &EpochRow) -> Result<()> {
        let context = || format!("writing {}", self.path.display());
        let existing = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut lines = existing.lines();
        let old_header: Vec<&str> = lines.next().map_or(Vec::new(), |h| h.split(',').collect());
        let kept: Vec<&str> = lines
            .filter(|l| {
                l.split(',').next().and_then(|e| e.parse::<f64>().ok()).is_some_and(|e| e < row.epoch)
            })
            .collect();
        let values = row.columns();
        // The file's columns in their order, each new one after the row's column before it.
        let mut header = old_header.clone();
        let mut at = 0;
        for (column, _) in &values {
            match header.iter().position(|h| h == column) {
                Some(i) => at = i + 1,
                None => {
                    header.insert(at, column);
                    at += 1;
                }
            }
        }
        // A row laid out under `header` from its (column, value) pairs.
        let line = |pairs: &[(&str, &str)]| {
            let cells: Vec<&str> =
                header.iter().map(|h| pairs.iter().find(|(c, _)| c == h).map_or("", |(_, v)| v)).collect();
            cells.join(",") + "\n"
        };
        let pairs: Vec<(&str, &str)> = values.iter().map(|(c, v)| (c.as_str(), v.as_str())).collect();
        let new_line = line(&pairs);
        let rewrite = old_header != header || kept.len() + 1 != existing.lines().count();
        if rewrite {
            let mut text = header.join(",") + "\n";
            for l in kept {
                let pairs: Vec<(&str, &str)> = old_header.iter().copied().zip(l.split(',')).collect();
                text.push_str(&line(&pairs));
            }
            text.push_str(&new_line);
            crate::fsio::write_atomic(&self.path, text.as_bytes()).with_context(context)
        } else {
            let mut file = std::fs::OpenOptions::new().append(true).open(&self.path).with_context(context)?;
            file.write_all(new_line.as_bytes()).with_context(context)
        }
    }

    /// The rows as (column, value) pairs per epoch, a row's empty cells left out, for plots
    /// and tests.
    pub fn read(&self) -> Result<Vec<Vec<(String, f64)>>> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
        lines
            .map(|l| {
                l.split(',')
                    .zip(&header)
                    .filter(|(v, _)| !v.is_empty())
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
        let quality = Quality { psnr_db: 20.0, ssim: Some(0.5), l1: 0.1, mse: 0.01, lpips: None };
        EpochRow {
            epoch: epoch as f64,
            step: epoch * 10,
            train: stats,
            test: stats,
            quality,
            rfid: None,
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
        let header = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert!(header.starts_with(&HEADER.replace("test_psnr", "test_psnr,test_ssim")), "{header}");
        assert_eq!(rows[0].len(), HEADER.split(',').count() + 1);
        assert_eq!(rows[1][10], ("active_dims".to_string(), 4.0));
        assert_eq!(rows[1][8..10], [("test_psnr".to_string(), 20.0), ("test_ssim".to_string(), 0.5)]);
    }

    #[test]
    fn a_partial_epochs_row_stays_before_its_epochs_end_and_goes_with_a_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::new(&dir.path().join("metrics.csv"));
        log.append(&row(1)).unwrap();
        // Stopped at --max-steps 12 (of 10 per epoch), then resumed to the end of epoch 2.
        let partial = EpochRow { epoch: 1.2, step: 12, ..row(1) };
        log.append(&partial).unwrap();
        log.append(&row(2)).unwrap();
        let epochs = |log: &MetricsLog| log.read().unwrap().iter().map(|r| r[0].1).collect::<Vec<f64>>();
        assert_eq!(epochs(&log), [1.0, 1.2, 2.0]);
        let text = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert!(text.contains("\n1,10,") && text.contains("\n1.2,12,"), "{text}");
        // Resumed from epoch 1's checkpoint again and stopped sooner: the later rows go.
        log.append(&EpochRow { epoch: 1.1, step: 11, ..row(1) }).unwrap();
        assert_eq!(epochs(&log), [1.0, 1.1]);
    }

    #[test]
    fn a_change_of_columns_rewrites_the_file_with_every_value_under_its_own_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        let log = MetricsLog::new(&path);
        log.append(&row(1)).unwrap();
        // A resume that turned LPIPS and the GAN on, then one that turned them off again.
        let mut gan = row(2);
        gan.train.sharpness = Some([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]);
        gan.quality.lpips = Some(0.25);
        gan.rfid = Some(12.5);
        log.append(&gan).unwrap();
        log.append(&row(3)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let header = text.lines().next().unwrap();
        assert!(header.contains(",test_psnr,test_ssim,test_lpips,test_rfid,active_dims,"), "{header}");
        assert!(header.ends_with(",seconds,train_lpips,train_g_loss,train_d_weight,train_d_loss,train_logits_real,train_logits_fake,train_logvar"), "{header}");
        let rows = log.read().unwrap();
        let get = |r: usize, k: &str| rows[r].iter().find(|(c, _)| c == k).map(|(_, v)| *v);
        assert_eq!((get(1, "train_logvar"), get(1, "test_lpips")), (Some(0.7), Some(0.25)));
        assert_eq!(get(1, "test_rfid"), Some(12.5));
        for r in [0, 2] {
            assert_eq!((get(r, "train_lpips"), get(r, "test_lpips")), (None, None), "row {r}: {text}");
            assert_eq!(get(r, "test_rfid"), None, "row {r}: {text}");
            assert_eq!(rows[r].len(), HEADER.split(',').count() + 1);
        }
    }

    #[test]
    fn a_file_of_an_older_layout_keeps_its_rows_under_their_own_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        // Before test_psnr: the sharpness columns came right after `seconds`.
        let old = "epoch,step,train_loss,train_reconstruction,train_kl,test_loss,test_reconstruction,\
                   test_kl,active_dims,lr,images_per_s,seconds,train_lpips\n\
                   1,10,3.0,2.0,1.0,3.5,2.5,1.0,4,0.001,100.0,1.00,0.125\n";
        std::fs::write(&path, old).unwrap();
        let log = MetricsLog::new(&path);
        let mut next = row(2);
        next.train.sharpness = Some([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]);
        log.append(&next).unwrap();
        let rows = log.read().unwrap();
        let get = |r: usize, k: &str| rows[r].iter().find(|(c, _)| c == k).map(|(_, v)| *v);
        assert_eq!(
            (get(0, "train_lpips"), get(0, "test_psnr"), get(0, "seconds")),
            (Some(0.125), None, Some(1.0))
        );
        assert_eq!((get(1, "train_lpips"), get(1, "test_psnr")), (Some(0.1), Some(20.0)));
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
