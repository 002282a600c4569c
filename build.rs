//! Makes the binary find libtorch without LD_LIBRARY_PATH, and see CUDA when it is there.

use std::path::Path;

fn main() {
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
}
