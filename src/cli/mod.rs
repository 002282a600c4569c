//! Each subcommand's arguments and body; `main.rs` only lists them.

pub mod bench;
pub mod export;
pub mod info;
pub mod inspect;
pub mod launch;
pub mod train;

/// Keeps glibc from returning freed blocks to the kernel: libtorch frees and reallocates
/// same-sized tensors every step, and with glibc's defaults each one is a fresh mmap whose
/// pages fault in again (`vae eval --iw-samples 100`: 62 s, 42 of them in the kernel, against
/// 37 s). Blocks of 48 MiB and more are still mmapped, as PyTorch's process has them: keeping
/// those too made the resnet family 1.44x diffusers at 128 x 128 on the CPU, but with 5% more
/// peak memory; at 48 MiB it is 1.19x with 3% less (BENCHMARKS.md). glibc's own
/// `MALLOC_MMAP_THRESHOLD_` in the environment (bytes) overrides the threshold.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let env = std::env::var("MALLOC_MMAP_THRESHOLD_").ok();
        let threshold = env.and_then(|v| v.parse().ok()).unwrap_or(48 << 20);
        // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, threshold);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
