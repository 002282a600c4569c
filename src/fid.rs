//! rFID: the Fréchet Inception Distance (Heusel et al. 2017) between a split's images and
//! their reconstructions, the figure latent diffusion and the Stable Diffusion VAEs are
//! compared by. Computed as pytorch-fid computes FID: each image resized to 299 x 299
//! (bilinear), mapped to [-1, 1] and through the FID variant of Inception v3 (TensorFlow's
//! 2015 graph: average pools that leave padding out, a max pool in the last block) to its
//! 2048 pool features; then |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) over the features'
//! means and covariances.
//!
//! The network is frozen and its weights come from a safetensors file holding pytorch-fid's
//! state dict (`scripts/fid_weights.py` writes it): nothing is downloaded at run time.

use crate::models::{passes, pixels_per_pass};
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Pool features per image.
pub const FEATURES: i64 = 2048;
/// BatchNorm's epsilon in the FID Inception (TensorFlow's).
const BN_EPS: f64 = 1e-3;

/// A convolution with its BatchNorm folded in (the network only ever runs in eval mode).
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: [i64; 2],
}

/// One `BasicConv2d` of torchvision's Inception: its state-dict prefix, channels, kernel,
/// stride and padding.
struct Spec {
    name: String,
    channels: [i64; 2],
    kernel: [i64; 2],
    stride: i64,
    padding: [i64; 2],
}

fn spec(name: &str, cin: i64, cout: i64, kernel: [i64; 2], stride: i64, padding: [i64; 2]) -> Spec {
    Spec { name: name.to_string(), channels: [cin, cout], kernel, stride, padding }
}

/// Every convolution of the network up to its pool features, by torchvision's names.
fn specs() -> Vec<Spec> {
    let (k1, k3) = ([1, 1], [3, 3]);
    let mut v = vec![
        spec("Conv2d_1a_3x3", 3, 32, k3, 2, [0, 0]),
        spec("Conv2d_2a_3x3", 32, 32, k3, 1, [0, 0]),
        spec("Conv2d_2b_3x3", 32, 64, k3, 1, [1, 1]),
        spec("Conv2d_3b_1x1", 64, 80, k1, 1, [0, 0]),
        spec("Conv2d_4a_3x3", 80, 192, k3, 1, [0, 0]),
    ];
    for (name, cin, pool) in [("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)] {
        let c = |branch: &str, i, o, k, p| spec(&format!("{name}.{branch}"), i, o, k, 1, p);
        v.extend([
            c("branch1x1", cin, 64, k1, [0, 0]),
            c("branch5x5_1", cin, 48, k1, [0, 0]),
            c("branch5x5_2", 48, 64, [5, 5], [2, 2]),
            c("branch3x3dbl_1", cin, 64, k1, [0, 0]),
            c("branch3x3dbl_2", 64, 96, k3, [1, 1]),
            c("branch3x3dbl_3", 96, 96, k3, [1, 1]),
            c("branch_pool", cin, pool, k1, [0, 0]),
        ]);
    }
    v.extend([
        spec("Mixed_6a.branch3x3", 288, 384, k3, 2, [0, 0]),
        spec("Mixed_6a.branch3x3dbl_1", 288, 64, k1, 1, [0, 0]),
        spec("Mixed_6a.branch3x3dbl_2", 64, 96, k3, 1, [1, 1]),
        spec("Mixed_6a.branch3x3dbl_3", 96, 96, k3, 2, [0, 0]),
    ]);
    let (row, col) = (([1, 7], [0, 3]), ([7, 1], [3, 0]));
    for (name, c7) in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)] {
        let c = |branch: &str, i, o, (k, p): ([i64; 2], [i64; 2])| {
            spec(&format!("{name}.{branch}"), i, o, k, 1, p)
        };
        let one = (k1, [0, 0]);
        v.extend([
            c("branch1x1", 768, 192, one),
            c("branch7x7_1", 768, c7, one),
            c("branch7x7_2", c7, c7, row),
            c("branch7x7_3", c7, 192, col),
            c("branch7x7dbl_1", 768, c7, one),
            c("branch7x7dbl_2", c7, c7, col),
            c("branch7x7dbl_3", c7, c7, row),
            c("branch7x7dbl_4", c7, c7, col),
            c("branch7x7dbl_5", c7, 192, row),
            c("branch_pool", 768, 192, one),
        ]);
    }
    v.extend([
        spec("Mixed_7a.branch3x3_1", 768, 192, k1, 1, [0, 0]),
        spec("Mixed_7a.branch3x3_2", 192, 320, k3, 2, [0, 0]),
        spec("Mixed_7a.branch7x7x3_1", 768, 192, k1, 1, [0, 0]),
        spec("Mixed_7a.branch7x7x3_2", 192, 192, row.0, 1, row.1),
        spec("Mixed_7a.branch7x7x3_3", 192, 192, col.0, 1, col.1),
        spec("Mixed_7a.branch7x7x3_4", 192, 192, k3, 2, [0, 0]),
    ]);
    for (name, cin) in [("Mixed_7b", 1280), ("Mixed_7c", 2048)] {
        let c = |branch: &str, i, o, k, p| spec(&format!("{name}.{branch}"), i, o, k, 1, p);
        v.extend([
            c("branch1x1", cin, 320, k1, [0, 0]),
            c("branch3x3_1", cin, 384, k1, [0, 0]),
            c("branch3x3_2a", 384, 384, [1, 3], [0, 1]),
            c("branch3x3_2b", 384, 384, [3, 1], [1, 0]),
            c("branch3x3dbl_1", cin, 448, k1, [0, 0]),
            c("branch3x3dbl_2", 448, 384, k3, [1, 1]),
            c("branch3x3dbl_3a", 384, 384, [1, 3], [0, 1]),
            c("branch3x3dbl_3b", 384, 384, [3, 1], [1, 0]),
            c("branch_pool", cin, 192, k1, [0, 0]),
        ]);
    }
    v
}

/// The FID Inception up to its pool features.
pub struct Inception {
    /// CRC-32 of the weights file: a run's rFID figures compare only under the same weights.
    pub checksum: u32,
    convs: HashMap<String, Conv>,
}

impl Inception {
    /// Reads pytorch-fid's state dict from `path` (names such as `Conv2d_1a_3x3.conv.weight`,
    /// `Mixed_7c.branch_pool.bn.running_var`; the classifier `fc.` and BatchNorm's
    /// `num_batches_tracked` may be there and are not read) onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let reading = || format!("reading FID Inception weights {} (--fid-weights)", path.display());
        // Read once more by tch below (at start only): the bytes are not kept meanwhile.
        let checksum = crc32fast::hash(&std::fs::read(path).with_context(reading)?);
        let tensors: HashMap<String, Tensor> =
            Tensor::read_safetensors(path).with_context(reading)?.into_iter().collect();
        let specs = specs();
        let known = |name: &str| {
            name.starts_with("fc.")
                || name.ends_with(".num_batches_tracked")
                || specs
                    .iter()
                    .any(|s| name.strip_prefix(s.name.as_str()).is_some_and(|rest| rest.starts_with('.')))
        };
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        if let Some(stray) = names.into_iter().find(|n| !known(n)) {
            bail!(
                "{}: tensor {stray} is not part of the FID Inception (pytorch-fid's; torchvision's \
                 ImageNet Inception is another network); scripts/fid_weights.py writes the file",
                path.display()
            );
        }
        let take = |name: String, shape: &[i64]| -> Result<Tensor> {
            let t = tensors.get(&name).with_context(|| {
                format!(
                    "{} holds no tensor {name}: not pytorch-fid's Inception state dict; scripts/fid_weights.py writes one",
                    path.display()
                )
            })?;
            ensure!(
                t.size() == shape,
                "{}: tensor {name} has shape {:?}, the FID Inception needs {shape:?}",
                path.display(),
                t.size()
            );
            Ok(t.to_kind(Kind::Double))
        };
        let mut convs = HashMap::new();
        for s in specs {
            let ([cin, cout], [kh, kw]) = (s.channels, s.kernel);
            let weight = take(format!("{}.conv.weight", s.name), &[cout, cin, kh, kw])?;
            let bn = |field: &str| take(format!("{}.bn.{field}", s.name), &[cout]);
            let scale = bn("weight")? / (bn("running_var")? + BN_EPS).sqrt();
            let bias = bn("bias")? - bn("running_mean")? * &scale;
            let weight = weight * scale.view([cout, 1, 1, 1]);
            let on = |t: Tensor| t.to_kind(Kind::Float).to_device(device);
            convs.insert(
                s.name,
                Conv { weight: on(weight), bias: on(bias), stride: s.stride, padding: s.padding },
            );
        }
        Ok(Self { checksum, convs })
    }

    fn conv(&self, name: &str, x: &Tensor) -> Tensor {
        let c = &self.convs[name];
        x.conv2d(&c.weight, Some(&c.bias), [c.stride, c.stride], c.padding, [1, 1], 1).relu_()
    }

    /// The convolutions `names` one after another, each on the last's output.
    fn chain(&self, block: &str, names: &[&str], x: &Tensor) -> Tensor {
        names.iter().fold(x.shallow_clone(), |h, n| self.conv(&format!("{block}.{n}"), &h))
    }

    /// TensorFlow's 3x3 average pool: the padding is not counted.
    fn avg_pool(x: &Tensor) -> Tensor {
        x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>)
    }

    fn max_pool(x: &Tensor, stride: i64, padding: i64) -> Tensor {
        x.max_pool2d([3, 3], [stride, stride], [padding, padding], [1, 1], false)
    }

    /// The 2048 pool features of each image of `x` (`[N, C, H, W]` in [0, 1]; one channel is
    /// read as grey and repeated to three), `[N, 2048]` in float32, in passes as the models
    /// take them (at 299 x 299: 23 images on CUDA, one on the CPU).
    pub fn features(&self, x: &Tensor) -> Tensor {
        let chunk = (pixels_per_pass(x.device()) / (299 * 299)).max(1);
        let parts: Vec<Tensor> = tch::no_grad(|| {
            passes(x.size()[0], chunk).map(|(i, n)| self.pool_features(&x.narrow(0, i, n))).collect()
        });
        Tensor::cat(&parts, 0)
    }

    fn pool_features(&self, x: &Tensor) -> Tensor {
        let [n, _, h, w]: [i64; 4] = x.size().try_into().expect("NCHW images");
        let x = x.to_kind(Kind::Float).expand([n, 3, h, w], false);
        let x = x.upsample_bilinear2d([299, 299], false, None, None) * 2.0 - 1.0;
        let stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"];
        let mut h = stem.iter().fold(x, |h, name| self.conv(name, &h));
        h = Self::max_pool(&h, 2, 0);
        h = self.conv("Conv2d_4a_3x3", &self.conv("Conv2d_3b_1x1", &h));
        h = Self::max_pool(&h, 2, 0);
        for block in ["Mixed_5b", "Mixed_5c", "Mixed_5d"] {
            h = Tensor::cat(
                &[
                    self.chain(block, &["branch1x1"], &h),
                    self.chain(block, &["branch5x5_1", "branch5x5_2"], &h),
                    self.chain(block, &["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], &h),
                    self.chain(block, &["branch_pool"], &Self::avg_pool(&h)),
                ],
                1,
            );
        }
        let b = "Mixed_6a";
        h = Tensor::cat(
            &[
                self.chain(b, &["branch3x3"], &h),
                self.chain(b, &["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], &h),
                Self::max_pool(&h, 2, 0),
            ],
            1,
        );
        for block in ["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"] {
            let double =
                ["branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"];
            h = Tensor::cat(
                &[
                    self.chain(block, &["branch1x1"], &h),
                    self.chain(block, &["branch7x7_1", "branch7x7_2", "branch7x7_3"], &h),
                    self.chain(block, &double, &h),
                    self.chain(block, &["branch_pool"], &Self::avg_pool(&h)),
                ],
                1,
            );
        }
        let d = "Mixed_7a";
        h = Tensor::cat(
            &[
                self.chain(d, &["branch3x3_1", "branch3x3_2"], &h),
                self.chain(d, &["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"], &h),
                Self::max_pool(&h, 2, 0),
            ],
            1,
        );
        for (block, last) in [("Mixed_7b", false), ("Mixed_7c", true)] {
            let split = self.chain(block, &["branch3x3_1"], &h);
            let double = self.chain(block, &["branch3x3dbl_1", "branch3x3dbl_2"], &h);
            // The FID Inception's last block max-pools where the paper average-pools.
            let pooled = if last { Self::max_pool(&h, 1, 1) } else { Self::avg_pool(&h) };
            h = Tensor::cat(
                &[
                    self.chain(block, &["branch1x1"], &h),
                    self.chain(block, &["branch3x3_2a"], &split),
                    self.chain(block, &["branch3x3_2b"], &split),
                    self.chain(block, &["branch3x3dbl_3a"], &double),
                    self.chain(block, &["branch3x3dbl_3b"], &double),
                    self.chain(block, &["branch_pool"], &pooled),
                ],
                1,
            );
        }
        h.mean_dim([2, 3].as_slice(), false, Kind::Float)
    }
}

/// Sums of feature vectors and of their outer products, in double precision: their mean and
/// covariance at the end, without holding the features.
pub struct Moments {
    count: Tensor,
    sum: Tensor,
    outer: Tensor,
}

impl Moments {
    pub fn new(dim: i64, device: Device) -> Self {
        let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Double, device));
        Self { count: zeros(&[]), sum: zeros(&[dim]), outer: zeros(&[dim, dim]) }
    }

    /// Adds the rows of `features` (`[N, D]`).
    pub fn add(&mut self, features: &Tensor) {
        let f = features.to_kind(Kind::Double);
        self.count += f.size()[0] as f64;
        self.sum += f.sum_dim_intlist(0, false, None);
        self.outer += f.transpose(0, 1).matmul(&f);
    }

    /// The sums, every one of them: summed over ranks, they are the moments of all.
    fn sums(&self) -> [Tensor; 3] {
        [&self.count, &self.sum, &self.outer].map(Tensor::shallow_clone)
    }

    /// The mean and the unbiased covariance (numpy's `np.cov`), on the CPU.
    fn mean_covariance(&self) -> (Tensor, Tensor) {
        let n = self.count.double_value(&[]);
        let mean = self.sum.to_device(Device::Cpu) / n;
        let outer = self.outer.to_device(Device::Cpu);
        let cov = (outer - mean.unsqueeze(1).matmul(&mean.unsqueeze(0)) * n) / (n - 1.0);
        (mean, cov)
    }
}

/// The square root of a symmetric positive semi-definite matrix, by its eigenvectors
/// (rounding's negative eigenvalues taken as 0).
fn psd_sqrt(m: &Tensor) -> Tensor {
    let (values, vectors) = ((m + m.transpose(0, 1)) / 2.0).linalg_eigh("L");
    (&vectors * values.clamp_min(0.0).sqrt().unsqueeze(0)).matmul(&vectors.transpose(0, 1))
}

/// The Fréchet distance between the Gaussians of two feature sets' means and covariances.
/// tr((C1 C2)^(1/2)) is taken as the trace of (C1^(1/2) C2 C1^(1/2))^(1/2), a symmetric
/// matrix with the same eigenvalues, so that covariances of fewer samples than dimensions
/// (singular) need none of the offset pytorch-fid falls back on.
pub fn frechet_distance(a: &Moments, b: &Moments) -> f64 {
    let ((mu1, c1), (mu2, c2)) = (a.mean_covariance(), b.mean_covariance());
    let root = psd_sqrt(&c1);
    let product = root.matmul(&c2).matmul(&root);
    let (values, _) = ((&product + product.transpose(0, 1)) / 2.0).linalg_eigh("L");
    let cross = values.clamp_min(0.0).sqrt().sum(Kind::Double);
    let distance = (mu1 - mu2).square().sum(Kind::Double) + c1.trace() + c2.trace() - cross * 2.0;
    distance.double_value(&[])
}

/// The moments of a split's images and of their reconstructions, for its rFID.
pub struct ReconstructionMoments {
    real: Moments,
    fake: Moments,
}

impl ReconstructionMoments {
    pub fn new(device: Device) -> Self {
        Self { real: Moments::new(FEATURES, device), fake: Moments::new(FEATURES, device) }
    }

    /// Adds images `x` and their reconstructions `x_hat`, the reconstructions clamped to
    /// [0, 1] and rounded to 8 bits as the PNGs that pytorch-fid would read (the images are
    /// 8-bit already).
    pub fn add(&mut self, net: &Inception, x: &Tensor, x_hat: &Tensor) {
        let x_hat = (x_hat.clamp(0.0, 1.0) * 255.0).round() / 255.0;
        self.real.add(&net.features(x));
        self.fake.add(&net.features(&x_hat));
    }

    /// The sums the moments are made of, for an all-reduce over ranks that each added a share.
    pub fn sums(&self) -> Vec<Tensor> {
        self.real.sums().into_iter().chain(self.fake.sums()).collect()
    }

    /// The Fréchet distance between the two.
    pub fn rfid(&self) -> Result<f64> {
        let n = self.real.count.double_value(&[]);
        ensure!(n >= 2.0, "rFID needs at least 2 images, the split has {n}");
        Ok(frechet_distance(&self.real, &self.fake))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distance_of_gaussians_is_their_closed_form() {
        // Diagonal covariances commute: tr((C1 C2)^(1/2)) = sum sqrt(c1 c2).
        let a =
            Tensor::from_slice(&[1.0f64, -1.0, 1.0, -1.0, 3.0, 3.0, 5.0, 5.0]).view([2, 4]).transpose(0, 1);
        let b = Tensor::from_slice(&[2.0f64, 0.0, 2.0, 0.0, 0.0, 0.0, 8.0, 8.0]).view([2, 4]).transpose(0, 1);
        let (mut ma, mut mb) = (Moments::new(2, Device::Cpu), Moments::new(2, Device::Cpu));
        ma.add(&a);
        mb.add(&b);
        // Means (0, 4) and (1, 4); variances (4/3, 4/3) and (4/3, 64/3).
        let (v1, v2): ([f64; 2], [f64; 2]) = ([4.0 / 3.0, 4.0 / 3.0], [4.0 / 3.0, 64.0 / 3.0]);
        let expected = 1.0 + (0..2).map(|i| v1[i] + v2[i] - 2.0 * (v1[i] * v2[i]).sqrt()).sum::<f64>();
        assert!((frechet_distance(&ma, &mb) - expected).abs() < 1e-9, "{}", frechet_distance(&ma, &mb));
        assert!(frechet_distance(&ma, &ma).abs() < 1e-9);
    }

    #[test]
    fn moments_summed_over_shares_are_the_moments_of_the_whole() {
        // What the ranks of a data-parallel run do with their shares of a test split.
        tch::manual_seed(0);
        let options = (Kind::Double, Device::Cpu);
        let (real, fake) = (Tensor::randn([9, 3], options), Tensor::randn([9, 3], options) * 2.0 + 1.0);
        let moments = |rows: (i64, i64)| {
            let of = |f: &Tensor| {
                let mut m = Moments::new(3, Device::Cpu);
                m.add(&f.narrow(0, rows.0, rows.1));
                m
            };
            ReconstructionMoments { real: of(&real), fake: of(&fake) }
        };
        let (first, second) = (moments((0, 4)), moments((4, 5)));
        for (mut a, b) in first.sums().into_iter().zip(second.sums()) {
            a += b;
        }
        let (summed, whole) = (first.rfid().unwrap(), moments((0, 9)).rfid().unwrap());
        assert!((summed - whole).abs() < 1e-9 * whole, "{summed} {whole}");
        let one = moments((0, 1)).rfid().unwrap_err().to_string();
        assert!(one.contains("rFID needs at least 2 images, the split has 1"), "{one}");
    }

    #[test]
    fn a_file_of_another_network_is_refused_naming_its_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        Tensor::write_safetensors(
            &[("AuxLogits.conv0.conv.weight", Tensor::zeros([1], tch::kind::FLOAT_CPU))],
            &path,
        )
        .unwrap();
        let err = Inception::load(&path, Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("tensor AuxLogits.conv0.conv.weight is not part of the FID Inception"), "{err}");
    }
}
