//! Compiles proto/ with protox (a Rust protobuf compiler: no protoc needed on the machine) into tonic/prost code,
//! and keeps the encoded descriptor set for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/runner/v1/runner.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("runner_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
