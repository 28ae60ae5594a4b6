//! Generates include/qbm.h from src/ffi with cbindgen and gives the shared
//! library its SONAME.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libqbm.so.0");
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        dir.join("src/ffi/libqbm.map").display()
    );
    let config =
        cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml is valid");
    // Only the ffi module is the C contract: parse its files, not the crate.
    let generated = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/ffi/types.rs"))
        .with_src(dir.join("src/ffi/api.rs"))
        .generate();
    match generated {
        Ok(bindings) => {
            bindings.write_to_file(dir.join("include/qbm.h"));
        }
        Err(e) => panic!("cbindgen failed to generate include/qbm.h: {e}"),
    }
}
