//! Compiles proto/ with protox (a Rust protobuf compiler: no protoc needed on the machine) into tonic/prost code,
//! keeps the encoded descriptor set for server reflection, and builds the static in-container agent
//! (`runner-agent`) so the `runner` binary carries it: `cargo install --path .` gives a runner that builds its
//! base image anywhere, without the source tree.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/runner/v1/runner.proto";
    println!("cargo:rerun-if-changed={proto}");
    // sqlx::migrate! embeds the migrations: a new one must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("runner_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    embed_agent(&out)?;
    Ok(())
}

/// Builds the agent statically (`--target x86_64-unknown-linux-gnu`, `+crt-static`) with a nested cargo into a
/// target directory of its own beside ours (`<target>/embedded-agent`: shared by every profile and by clippy,
/// so after the first build it is a quick no-op; never a directory the outer cargo holds a lock on), and copies
/// it to `OUT_DIR/opschain-agent` for `include_bytes!`. `RUNNER_EMBED_AGENT=FILE` embeds a prebuilt agent instead.
fn embed_agent(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=RUNNER_EMBED_AGENT");
    for watched in ["agent/src", "agent/Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={watched}");
    }
    let embedded = out.join("opschain-agent");
    if let Some(prebuilt) = std::env::var_os("RUNNER_EMBED_AGENT") {
        std::fs::copy(&prebuilt, &embedded)
            .map_err(|e| format!("RUNNER_EMBED_AGENT={}: {e}", Path::new(&prebuilt).display()))?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    // OUT_DIR is <target>/[<triple>/]<profile>/build/runner-<hash>/out; cargo marks <target> with CACHEDIR.TAG.
    let target = out
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").exists())
        .map(|dir| dir.join("embedded-agent"))
        .unwrap_or_else(|| out.join("embedded-agent"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "runner-agent",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--manifest-path",
        ])
        .arg(manifest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    // What the outer cargo set for its own compilation (flags, wrappers such as clippy-driver) is not the agent's.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name == "CARGO_ENCODED_RUSTFLAGS"
            || name == "RUSTC_WRAPPER"
            || name == "RUSTC_WORKSPACE_WRAPPER"
            || name == "CARGO_TARGET_DIR"
            || name == "CARGO_BUILD_TARGET"
            || name.starts_with("CARGO_PROFILE_")
        {
            command.env_remove(name.as_ref());
        }
    }
    let status = command.status()?;
    if !status.success() {
        return Err(format!(
            "building the static agent for embedding failed ({status}); install the target with `rustup target add \
             x86_64-unknown-linux-gnu` and glibc's static libraries (Debian: libc6-dev), or give a prebuilt one with \
             RUNNER_EMBED_AGENT=FILE"
        )
        .into());
    }
    std::fs::copy(
        target.join("x86_64-unknown-linux-gnu/release/opschain-agent"),
        &embedded,
    )?;
    Ok(())
}
