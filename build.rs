//! Makes the binary find libtorch without LD_LIBRARY_PATH, and see CUDA when it is there; and
//! compiles the torch.distributed shim (src/dist/shim.cpp) when Gloo's headers are present.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(vae_gloo)");
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
    distributed_shim(Path::new(&lib_dir));
}

/// The c10d shim, against the wheel's headers (`torch/include`, beside `torch/lib`) and Gloo's
/// (Debian's libgloo-dev, or `GLOO_INCLUDE`). Without them the build goes on, and a run of
/// several processes says what to install.
fn distributed_shim(lib_dir: &Path) {
    println!("cargo:rerun-if-changed=src/dist/shim.cpp");
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
    cc::Build::new()
        .cpp(true)
        .file("src/dist/shim.cpp")
        .include(&torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .include(&gloo_include)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        // libtorch's headers warn by the hundred; ours is a few lines.
        .warnings(false)
        .flag("-w")
        .compile("vae_dist_shim");
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
    println!("cargo:rustc-cfg=vae_gloo");
}
