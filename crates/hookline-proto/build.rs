//! Generates the gRPC code and the reflection descriptor set from `proto/hookline/v1`.
//! protoc comes from `protoc-bin-vendored`, so no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the env.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let well_known = protoc_bin_vendored::include_path()?;

    // Read at run time, not with env!(): a build script compiled in another checkout
    // (a copied target directory) would otherwise read that checkout's protos.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = ["common", "registry", "ingest", "delivery"]
        .map(|name| root.join(format!("hookline/v1/{name}.proto")));
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    tonic_prost_build::configure()
        .btree_map(".")
        // Malformed messages are INVALID_ARGUMENT, not INTERNAL (see src/codec.rs).
        .codec_path("crate::codec::Codec")
        .file_descriptor_set_path(out.join("hookline_descriptor.bin"))
        .compile_protos(&files, &[root.clone(), well_known])?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
