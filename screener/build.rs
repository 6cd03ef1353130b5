//! Builds the XDP program (`screener-ebpf`) for `bpfel-unknown-none` and
//! embeds it in the daemon.
//!
//! The eBPF crate needs a compiler with the `core` sources and bpf-linker
//! (`cargo xtask` installs both); it is built with that compiler, not with the
//! one building this crate. `SCREENER_BPF_CARGO` / `SCREENER_BPF_RUSTC`
//! override where they are.
use std::{
    env,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

/// Every program the eBPF crate builds; each becomes a constant in
/// `ebpf_objects.rs`.
const PROGRAMS: &[(&str, &str)] = &[
    ("screener", "SCREENER"),
    ("floor", "FLOOR"),
    ("naive", "NAIVE"),
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let ebpf_dir = manifest.parent().unwrap().join("screener-ebpf");
    let common_dir = manifest.parent().unwrap().join("screener-common");
    for d in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", d.join("src").display());
        println!("cargo:rerun-if-changed={}", d.join("Cargo.toml").display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Cargo.lock").display()
    );
    println!("cargo:rerun-if-env-changed=SCREENER_BPF_CARGO");
    println!("cargo:rerun-if-env-changed=SCREENER_BPF_RUSTC");

    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.join("ebpf-target");
    let cargo = env::var("SCREENER_BPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
    let rustc = env::var("SCREENER_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");

    let mut cmd = Command::new(&cargo);
    // The outer build's cargo/rustc settings are for the host toolchain;
    // none of them may leak into the eBPF build.
    for (k, _) in env::vars() {
        if k.starts_with("CARGO") || k.starts_with("RUSTC") || k == "RUSTFLAGS" {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(&ebpf_dir)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .args(["build", "--locked", "-Z", "build-std=core", "--release"])
        .args(["--target", "bpfel-unknown-none", "--target-dir"])
        .arg(&target_dir);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run {cargo} to build the XDP program: {e}. \
             Run `cargo xtask test` (or `cargo xtask bootstrap`) to install the eBPF toolchain."
        )
    });
    assert!(
        status.success(),
        "building screener-ebpf with {cargo} failed ({status}); \
         `cargo xtask bootstrap` installs rustc-web, rust-web-src and bpf-linker"
    );

    let release = target_dir.join("bpfel-unknown-none/release");
    let mut generated = String::new();
    for (bin, konst) in PROGRAMS {
        let path = release.join(bin);
        assert!(path.exists(), "{} was not built", path.display());
        writeln!(
            generated,
            "/// The `{bin}` eBPF object.\npub static {konst}: &[u8] = ::aya::include_bytes_aligned!({:?});",
            path.display().to_string()
        )
        .unwrap();
    }
    std::fs::write(Path::new(&out_dir).join("ebpf_objects.rs"), generated).unwrap();
}
