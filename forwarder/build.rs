//! Builds the eBPF program of the sockmap data plane (`ebpf/`) with
//! aya-build, when the toolchain for it is installed (`scripts/setup-ebpf`:
//! nightly with rust-src, bpf-linker). Without it the forwarder still builds:
//! this script says why in a cargo warning, and `sockmap::probe()` returns
//! that reason at run time.
//!
//! Environment:
//! * `UPSPLICE_EBPF=off` skips the eBPF build (as does aya's `AYA_BUILD_SKIP=1`);
//! * `UPSPLICE_EBPF=require` makes a missing toolchain or a failed eBPF build
//!   a build error instead of a warning (for CI).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context as _, Result};

/// The eBPF crate, as named in `ebpf/Cargo.toml` and its binary.
const EBPF_PACKAGE: &str = "upsplice-ebpf";
/// The crate of types the eBPF program shares with userspace.
const COMMON_PACKAGE: &str = "upsplice-common";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(upsplice_ebpf)");
    println!("cargo::rerun-if-env-changed=UPSPLICE_EBPF");
    println!("cargo::rerun-if-env-changed=PATH");
    // Installing bpf-linker or a toolchain changes this directory.
    if let Some(bin) = cargo_bin() {
        println!("cargo::rerun-if-changed={}", bin.display());
    }
    let policy = env::var("UPSPLICE_EBPF").unwrap_or_default();
    let result = if policy == "off" { Err(anyhow!("UPSPLICE_EBPF=off")) } else { build() };
    match result {
        Ok(object) => {
            println!("cargo::rustc-cfg=upsplice_ebpf");
            println!("cargo::rustc-env=UPSPLICE_EBPF_OBJECT={}", object.display());
        }
        Err(why) => {
            let why = format!("{why:#}").replace('\n', " ");
            if policy == "require" {
                panic!("eBPF program not built (UPSPLICE_EBPF=require): {why}");
            }
            println!(
                "cargo::warning=sockmap data plane disabled, eBPF program not built: {why} (run scripts/setup-ebpf)"
            );
            println!("cargo::rustc-env=UPSPLICE_EBPF_MISSING={why}");
        }
    }
}

/// Builds the eBPF object and returns its path.
fn build() -> Result<PathBuf> {
    check_toolchain()?;
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let package_dir = |name: &str| {
        let package = metadata
            .packages
            .iter()
            .find(|p| p.name.as_str() == name)
            .ok_or_else(|| anyhow!("package {name} is not in the workspace"))?;
        package.manifest_path.parent().ok_or_else(|| anyhow!("{} has no parent", package.manifest_path))
    };
    let root_dir = package_dir(EBPF_PACKAGE)?;
    // aya-build reruns this script when the eBPF crate changes; the program
    // also builds from the common crate.
    println!("cargo::rerun-if-changed={}", package_dir(COMMON_PACKAGE)?);
    aya_build::build_ebpf(
        [aya_build::Package { name: EBPF_PACKAGE, root_dir: root_dir.as_str(), ..Default::default() }],
        aya_build::Toolchain::default(),
    )?;
    let object = PathBuf::from(env::var("OUT_DIR")?).join(EBPF_PACKAGE);
    if !object.is_file() {
        bail!("aya-build produced no {} (AYA_BUILD_SKIP set?)", object.display());
    }
    Ok(object)
}

/// Fails naming what is missing: nightly, its rust-src, or bpf-linker.
fn check_toolchain() -> Result<()> {
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .output()
        .context("rustup not found")?;
    if !sysroot.status.success() {
        bail!("no nightly toolchain");
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let core = sysroot.join("lib/rustlib/src/rust/library/core");
    if !core.is_dir() {
        bail!("nightly has no rust-src component");
    }
    if !on_path("bpf-linker") {
        bail!("bpf-linker not found on PATH");
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .map(|path| env::split_paths(&path).any(|dir| is_executable(&dir.join(program))))
        .unwrap_or(false)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

fn cargo_bin() -> Option<PathBuf> {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin"))
}
