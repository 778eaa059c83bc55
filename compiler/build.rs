//! Generates the ONNX protobuf types from the vendored `proto/onnx.proto` with protox (a pure
//! Rust protobuf compiler, so no `protoc` is needed). Every `bytes` field becomes
//! `bytes::Bytes`, so decoding from a memory-mapped file borrows tensor data instead of
//! copying it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["proto/onnx.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
