//! `--device auto|cpu|cuda|cuda:N`, checked against what libtorch actually sees, and
//! `--threads`.

use anyhow::{bail, ensure, Context, Result};
use tch::{Cuda, Device};

/// Where a command computes; every command that runs a model takes these.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// auto, cpu, cuda or cuda:N; auto takes the first GPU when there is one.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// libtorch's intra-op threads [default: libtorch's choice, one per core].
    #[arg(long)]
    pub threads: Option<i32>,
    /// Deterministic kernels only (PyTorch's use_deterministic_algorithms, cuDNN's deterministic
    /// algorithms, its benchmark off): a CUDA run then resumes bit for bit, as a CPU run always
    /// does, at some cost in speed. An operator without a deterministic kernel is refused.
    #[arg(long)]
    pub deterministic: bool,
}

impl DeviceArgs {
    /// Sets the thread count and the deterministic mode, and returns the device, checked.
    pub fn init(&self) -> Result<Device> {
        if self.deterministic {
            // cuBLAS reads it once, making its first handle: before any CUDA work (and
            // before libtorch's thread pool starts: the environment is not thread-safe). Its
            // deterministic workspace setting (PyTorch's documented one) unless the user set one.
            if std::env::var_os("CUBLAS_WORKSPACE_CONFIG").is_none() {
                std::env::set_var("CUBLAS_WORKSPACE_CONFIG", ":4096:8");
            }
            crate::native::set_deterministic();
        }
        if let Some(threads) = self.threads {
            ensure!(threads >= 1, "--threads must be at least 1, found {threads}");
            tch::set_num_threads(threads);
        }
        parse_device(&self.device)
    }
}

pub fn parse_device(spec: &str) -> Result<Device> {
    let cuda_count = || if Cuda::is_available() { Cuda::device_count() as usize } else { 0 };
    let cuda = |index: usize| -> Result<Device> {
        let count = cuda_count();
        if count == 0 {
            bail!("--device {spec}: CUDA is not available on this machine (libtorch sees no GPU); use --device cpu")
        }
        if index >= count {
            bail!("--device {spec}: only {count} CUDA device(s) visible (cuda:0..cuda:{})", count - 1)
        }
        Ok(Device::Cuda(index))
    };
    match spec {
        "auto" => Ok(if cuda_count() > 0 { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match spec.strip_prefix("cuda:") {
            Some(index) => cuda(
                index.parse().with_context(|| format!("--device {spec}: {index:?} is not a device index"))?,
            ),
            None => bail!("--device {spec}: expected auto, cpu, cuda or cuda:N"),
        },
    }
}

/// Waits for the device's queued work, so a clock read after it covers that work (a no-op
/// on the CPU, whose ops are synchronous).
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        Cuda::synchronize(i as i64);
    }
}

/// A short name for logs and metadata.
pub fn describe(device: Device) -> String {
    let name = match device {
        Device::Cpu => match tch::get_num_threads() {
            1 => "cpu (1 thread)".to_string(),
            n => format!("cpu ({n} threads)"),
        },
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    };
    // Read back from libtorch: what runs, not what was asked.
    if crate::native::is_deterministic() {
        name + ", deterministic algorithms"
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_explain() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        if !Cuda::is_available() {
            assert_eq!(parse_device("auto").unwrap(), Device::Cpu);
            let err = parse_device("cuda").unwrap_err().to_string();
            assert!(err.contains("CUDA is not available"), "{err}");
        }
        assert!(parse_device("cuda:x").unwrap_err().to_string().contains("not a device index"));
        assert!(parse_device("tpu").unwrap_err().to_string().contains("expected auto, cpu, cuda or cuda:N"));
    }
}
