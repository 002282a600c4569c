//! Each subcommand's arguments and body; `main.rs` only lists them.

pub mod bench;
pub mod info;
pub mod inspect;
pub mod launch;
pub mod train;

/// Keeps glibc from returning large freed blocks to the kernel: libtorch frees and
/// reallocates same-sized tensors every step, and with glibc's defaults each one is a fresh
/// mmap whose pages fault in again. Measured on `vae eval --iw-samples 100`: 62 s (42 s of it
/// in the kernel) before, 37 s after; training steps are unchanged.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
