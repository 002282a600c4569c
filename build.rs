//! Makes the binary find libtorch without LD_LIBRARY_PATH, and see CUDA when it is there; and
//! compiles the ATen calls tch lacks (src/native.cpp), and the torch.distributed shim
//! (src/dist/shim.cpp) when Gloo's headers are present.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(vae_gloo)");
    println!("cargo::rustc-check-cfg=cfg(vae_nccl)");
    // torch-sys exports its libtorch lib folder through the `links = "tch"` key.
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg=-Wl,-rpath={lib_dir}");
    // Nothing in our code references a libtorch_cuda symbol, so GNU ld's --as-needed would
    // drop it and libtorch would then report CUDA as absent. Keep it linked.
    if Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    native(Path::new(&lib_dir));
    distributed_shim(Path::new(&lib_dir));
}

/// A C++ compilation against the wheel's headers (`torch/include`, beside `torch/lib`), as
/// torch-sys compiles tch's own wrapper.
fn torch_build(lib_dir: &Path, file: &str) -> cc::Build {
    let torch_include = lib_dir.with_file_name("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file(file)
        .include(&torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // libtorch's headers warn by the hundred; ours are a few lines.
        .warnings(false)
        .flag("-w");
    build
}

/// The ATen calls tch lacks (src/native.cpp): foreach kernels, fused Adam, memory stats.
fn native(lib_dir: &Path) {
    println!("cargo:rerun-if-changed=src/native.cpp");
    println!("cargo:rerun-if-changed=src/tensor_list.h");
    torch_build(lib_dir, "src/native.cpp").compile("vae_native");
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
}

/// The c10d shim, against the wheel's headers (`torch/include`, beside `torch/lib`) and Gloo's
/// (Debian's libgloo-dev, or `GLOO_INCLUDE`); its NCCL half when the CUDA headers are there too.
/// Without them the build goes on, and a run of several processes says what to install.
fn distributed_shim(lib_dir: &Path) {
    for file in ["shim.h", "shim.cpp", "nccl.cpp"] {
        println!("cargo:rerun-if-changed=src/dist/{file}");
    }
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
    let torch_include = lib_dir.with_file_name("include");
    let gloo_include = std::env::var("GLOO_INCLUDE").unwrap_or_else(|_| "/usr/include".into());
    let c10d = torch_include.join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp");
    let gloo = Path::new(&gloo_include).join("gloo/config.h");
    if !c10d.exists() || !gloo.exists() {
        println!(
            "cargo:warning=building without torch.distributed: {} missing (install libgloo-dev)",
            if c10d.exists() { gloo.display() } else { c10d.display() }
        );
        return;
    }
    let torch = |file: &str| torch_build(lib_dir, &format!("src/dist/{file}"));
    torch("shim.cpp").include(&gloo_include).define("USE_C10D_GLOO", None).compile("vae_dist_shim");
    println!("cargo:rustc-cfg=vae_gloo");
    match cuda_includes(lib_dir) {
        Ok(includes) => {
            let mut build = torch("nccl.cpp");
            build.includes(includes).define("USE_C10D_NCCL", None).define("USE_CUDA", None);
            build.compile("vae_dist_nccl");
            println!("cargo:rustc-link-lib=torch_cuda");
            println!("cargo:rustc-link-lib=c10_cuda");
            println!("cargo:rustc-cfg=vae_nccl");
        }
        Err(missing) => println!("cargo:warning=building without NCCL: {missing}"),
    }
}

/// The headers ProcessGroupNCCL.hpp needs: the wheel's CUDA runtime and NCCL ones, with
/// `crt/` and `nv/target` from PyPI's nvidia-cuda-crt and nvidia-cuda-cccl (CUDA_INCLUDE
/// points elsewhere, e.g. a CUDA toolkit's include folder).
fn cuda_includes(lib_dir: &Path) -> Result<Vec<PathBuf>, String> {
    println!("cargo:rerun-if-env-changed=CUDA_INCLUDE");
    if !lib_dir.join("libtorch_cuda.so").exists() {
        return Err(format!("{} has no libtorch_cuda.so (a CPU-only torch)", lib_dir.display()));
    }
    // torch/lib -> site-packages/nvidia
    let nvidia = lib_dir.parent().and_then(Path::parent).map(|p| p.join("nvidia")).unwrap_or_default();
    let cuda = match std::env::var_os("CUDA_INCLUDE") {
        Some(dir) => PathBuf::from(dir),
        None => std::fs::read_dir(&nvidia)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("include"))
            .find(|p| p.join("cuda_runtime_api.h").exists())
            .ok_or_else(|| format!("no CUDA runtime headers under {}", nvidia.display()))?,
    };
    let nccl = nvidia.join("nccl/include");
    for needed in [cuda.join("crt/host_config.h"), cuda.join("nv/target"), nccl.join("nccl.h")] {
        if !needed.exists() {
            return Err(format!(
                "{} missing (scripts/setup installs nvidia-cuda-crt and nvidia-cuda-cccl)",
                needed.display()
            ));
        }
    }
    Ok(vec![cuda, nccl])
}
