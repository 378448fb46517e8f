//! Compiles `proto/isomesh.proto` with protox (pure Rust, so no `protoc` is needed) and generates
//! the Rust types with prost.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["isomesh.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
