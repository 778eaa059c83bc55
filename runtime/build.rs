//! Generates the bundle manifest types from `proto/bundle.proto` with protox (pure Rust, no
//! `protoc`). `bytes` fields become `bytes::Bytes` so that decoding borrows from the map.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/bundle.proto");
    let descriptors = protox::compile(["proto/bundle.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
