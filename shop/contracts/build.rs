//! Compiles proto/shop.proto with protox (pure Rust: no protoc binary needed) and generates
//! the tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/shop.proto");
    let descriptors = protox::compile(["proto/shop.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
