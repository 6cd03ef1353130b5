//! `cargo xtask`: bootstrap the toolchain and test peers, build, run, test,
//! benchmark.
//!
//! Every command first makes sure what it needs is installed, installing
//! only what is missing (a second run installs nothing), and says what it
//! is doing. A failure names the missing piece and the command that failed.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  bootstrap          install what building and testing need (Debian packages, bpf-linker)
  build              install what building needs, then build the daemon (release)
  run [ARGS...]      install what building and the demonstration need, build, then run
                     a private Postfix as the backend (mail to var/mail/inbox) and the
                     daemon (`screener -c screener.toml run ARGS`) in front of it;
                     Ctrl-C stops both
  test [ARGS...]     bootstrap, then fmt check, clippy and every unit and integration test
  bench xdp|smtp|flood|cluster|all
                     bootstrap, then run the benchmarks
  deb [--debug-build]
                     install what building needs, build (release), then the Debian
                     package target/debian/screener_<version>_amd64.deb; with
                     --debug-build, the same package from the debug build (what the
                     test suite checks, without a release build)
";

/// Debian packages for building the eBPF side: Debian's rustc with the
/// library sources (`-Z build-std=core` for bpfel-unknown-none; the rustup
/// toolchains here have no rust-src), the LLVM bpf-linker is built
/// against, and the tools that inspect and attach the program.
const BUILD_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "bpftool",
    "iproute2",
];

/// Debian packages `run` needs beyond building: the backend MTA of the
/// demonstration and the client the README sends a test mail with.
const RUN_PACKAGES: &[&str] = &["postfix", "swaks"];

/// Debian packages the tests and benchmarks start as real peers.
const TEST_PACKAGES: &[&str] = &[
    "postfix",
    "swaks",
    // swaks --tls
    "libnet-ssleay-perl",
    "libio-socket-ssl-perl",
    "openssl",
    "perl",
    "rbldnsd",
    "nftables",
    "util-linux",
    "procps",
    // systemd-analyze, to verify dist/screener.service
    "systemd",
    // the fleet's shared verdicts (redis-cli comes with it)
    "redis-server",
    // the log parsers whose regular expressions read the postscreen lines
    "fail2ban",
    "logwatch",
    "pflogsumm",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprint!("{USAGE}");
        std::process::exit(2);
    };
    let rest = &args[1..];
    env::set_current_dir(workspace_root())?;
    let everything = [BUILD_PACKAGES, RUN_PACKAGES, TEST_PACKAGES].concat();
    match cmd.as_str() {
        "bootstrap" => bootstrap(&everything),
        "build" => {
            bootstrap(BUILD_PACKAGES)?;
            build_release()
        }
        "run" => {
            bootstrap(&[BUILD_PACKAGES, RUN_PACKAGES].concat())?;
            build_release()?;
            run_demo(rest)
        }
        "test" => {
            bootstrap(&everything)?;
            test(rest)
        }
        "bench" => {
            bootstrap(&everything)?;
            bench(rest)
        }
        "deb" => {
            bootstrap(BUILD_PACKAGES)?;
            let debug = match rest {
                [] => false,
                [flag] if flag == "--debug-build" => true,
                _ => bail!("usage: cargo xtask deb [--debug-build]"),
            };
            deb(debug).map(|path| println!("{}", path.display()))
        }
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn step(what: &str) {
    eprintln!("==> {what}");
}

/// Runs a command to completion; a failure names it.
fn check(c: &mut Command) -> Result<()> {
    let shown = format!("{c:?}");
    let status = c
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Packages of `wanted` that dpkg does not report as installed.
fn missing_packages(wanted: &[&str]) -> Vec<String> {
    wanted
        .iter()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .map(|p| (*p).to_owned())
        .collect()
}

/// Installs whatever of `wanted` (Debian packages) and bpf-linker is
/// missing.
fn bootstrap(wanted: &[&str]) -> Result<()> {
    step("checking prerequisites");
    let missing = missing_packages(wanted);
    if missing.is_empty() {
        eprintln!("    Debian packages: all present");
    } else {
        if !is_root() {
            bail!(
                "missing Debian packages {}; run as root or install them: apt-get install {}",
                missing.join(" "),
                missing.join(" ")
            );
        }
        if missing.iter().any(|p| p == "postfix") {
            // No system MTA: tests start their own Postfix instances.
            step("preseeding postfix (no configuration, no system MTA)");
            let mut c = Command::new("debconf-set-selections");
            c.stdin(std::process::Stdio::piped());
            let mut child = c.spawn().context("cannot start debconf-set-selections")?;
            {
                use std::io::Write as _;
                let stdin = child.stdin.as_mut().expect("piped");
                stdin.write_all(b"postfix postfix/main_mailer_type select No configuration\n")?;
            }
            let st = child.wait()?;
            if !st.success() {
                bail!("debconf-set-selections failed ({st})");
            }
        }
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        check(
            Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context("updating the package lists")?;
        check(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .with_context(|| format!("installing {}", missing.join(" ")))?;
        let still = missing_packages(wanted);
        if !still.is_empty() {
            bail!("still missing after apt-get install: {}", still.join(" "));
        }
    }
    bpf_linker()?;
    if is_root() {
        mount_bpffs()?;
    }
    Ok(())
}

fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn bpf_linker() -> Result<()> {
    let bin = cargo_bin_dir().join("bpf-linker");
    let have = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if let Some(v) = have {
        if v.contains(BPF_LINKER_VERSION) {
            eprintln!("    bpf-linker: {}", v.trim());
            return Ok(());
        }
        eprintln!(
            "    bpf-linker: found {}, want {BPF_LINKER_VERSION}",
            v.trim()
        );
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
    ));
    check(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22", "--force"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
    .context("installing bpf-linker")
}

fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    step("mounting bpffs on /sys/fs/bpf");
    check(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// `cargo xtask run`: the backend Postfix and the daemon until Ctrl-C
/// (see `xtask::demo`).
fn run_demo(rest: &[String]) -> Result<()> {
    use xtask::demo::{self, Demo, Options};
    let root = workspace_root();
    let opts = Options {
        screener: root.join("target/release/screener"),
        config: root.join("screener.toml"),
        var: root.join("var"),
        log: None,
        run_args: rest.to_vec(),
    };
    demo::catch_interrupts();
    step("starting a private Postfix (var/postfix) as the backend, then the daemon with ./screener.toml");
    let mut running = Demo::start(opts.clone())?;
    let mailbox = running.mailbox();
    step(&format!(
        "running; Ctrl-C stops both. Send a test mail:\n    \
         swaks --server 127.0.0.1:2525 --to user@localhost\n\
         the first one waits out the 6 s greeting test (PASS NEW), a second one goes straight \
         through (PASS OLD); both land in {}.\n\
         Admin commands: export SCREENER_CONFIG={}, then {} stats",
        mailbox.display(),
        opts.config.display(),
        opts.screener.display(),
    ));
    let exited = running.wait(&demo::INTERRUPTED)?;
    let farewell = running.stop();
    demo::say(&format!("==> {farewell}"));
    match exited {
        Some(st) if !st.success() => bail!("the daemon stopped on its own ({st})"),
        _ => Ok(()),
    }
}

fn build_release() -> Result<()> {
    step("building screener (release)");
    check(Command::new("cargo").args(["build", "--release", "-p", "screener"]))
}

fn test(rest: &[String]) -> Result<()> {
    step("cargo fmt --check");
    check(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy --all-targets -- -D warnings");
    check(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("building the test binaries");
    check(Command::new("cargo").args(["build", "--workspace", "--bins"]))?;
    verify_unit()?;
    step("running every unit and integration test");
    check(
        Command::new("cargo")
            .args(["test", "--workspace"])
            .args(rest),
    )
}

/// `systemd-analyze verify` on the shipped unit. It insists that every
/// `Exec*=` binary exists, so it checks a copy naming the debug build
/// instead of `/usr/bin/screener`.
fn verify_unit() -> Result<()> {
    step("systemd-analyze verify dist/screener.service");
    let unit = std::fs::read_to_string("dist/screener.service")
        .context("reading dist/screener.service")?;
    let bin = workspace_root().join("target/debug/screener");
    let dir = env::temp_dir().join(format!("screener-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("screener.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/screener", &bin.to_string_lossy()),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .context("cannot start systemd-analyze (Debian package systemd)");
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    // It reports some problems without failing: any output is one.
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !said.trim().is_empty() {
        bail!(
            "systemd-analyze verify dist/screener.service ({}):\n{said}",
            out.status
        );
    }
    Ok(())
}

fn bench(rest: &[String]) -> Result<()> {
    let which = rest.first().map_or("all", String::as_str);
    let extra = rest.get(1..).unwrap_or_default();
    let bin = |name: &str, what: &str| -> Result<()> {
        step(&format!("benchmark: {what}"));
        check(
            Command::new("cargo")
                .args([
                    "run",
                    "--release",
                    "-p",
                    "integration-tests",
                    "--bin",
                    name,
                    "--",
                ])
                .args(extra),
        )
    };
    // The side-by-side benchmarks start the release daemon next to
    // themselves.
    let daemon = || {
        step("building screener (release) for the benchmarks");
        check(Command::new("cargo").args(["build", "--release", "-p", "screener"]))
    };
    let xdp = || bin("bench_xdp", "XDP per-packet cost (test_run)");
    let smtp = || -> Result<()> {
        daemon()?;
        bin("bench_smtp", "SMTP screening, screener vs postscreen")
    };
    let flood = || -> Result<()> {
        daemon()?;
        bin(
            "bench_flood",
            "connection flood: XDP vs nftables vs postscreen",
        )
    };
    let cluster = || -> Result<()> {
        daemon()?;
        bin(
            "bench_cluster",
            "a fleet of two nodes sharing verdicts through Redis",
        )
    };
    match which {
        "xdp" => xdp(),
        "smtp" => smtp(),
        "flood" => flood(),
        "cluster" => cluster(),
        "all" => {
            xdp()?;
            flood()?;
            smtp()?;
            cluster()
        }
        other => bail!("unknown benchmark {other:?}: xdp, smtp, flood, cluster or all"),
    }
}

const CARGO_DEB_VERSION: &str = "3.8.0";

/// Installs cargo-deb when it is missing (or another version).
fn cargo_deb() -> Result<()> {
    let have = Command::new(cargo_bin_dir().join("cargo-deb"))
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if let Some(v) = &have {
        if v.split_whitespace().any(|w| w == CARGO_DEB_VERSION) {
            eprintln!("    cargo-deb: {}", v.trim());
            return Ok(());
        }
    }
    step(&format!(
        "installing cargo-deb {CARGO_DEB_VERSION} (about two minutes)"
    ));
    check(Command::new("cargo").args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
        "--force",
    ]))
    .context("installing cargo-deb")
}

/// Where cargo puts its output: `CARGO_TARGET_DIR`, else `target/`.
fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// `cargo xtask deb`: the release binary (rebuilt only when stale), its
/// manual pages and shell completions, then cargo-deb with the metadata in
/// screener/Cargo.toml. Returns the package's path. With `debug`, the
/// package is made from the debug build instead: the suite checks the
/// package's shape without a release build of every dependency.
fn deb(debug: bool) -> Result<PathBuf> {
    cargo_deb()?;
    let (profile, dir) = if debug {
        step("building screener (debug)");
        // The workspace's build, as the suite has it: `-p screener` alone
        // unifies features differently and would build the crate again.
        check(Command::new("cargo").args(["build", "--workspace", "--bins"]))?;
        ("dev", "debug")
    } else {
        build_release()?;
        ("release", "release")
    };
    let release = target_dir().join(dir);
    let bin = release.join("screener");
    step("writing the manual pages and shell completions");
    // Where screener/Cargo.toml's assets look for them.
    let assets = release.join("deb-assets");
    let _ = std::fs::remove_dir_all(&assets);
    let man = assets.join("man");
    check(Command::new(&bin).arg("manpages").arg(&man))?;
    // Debian installs manual pages compressed; -n leaves out the time, so
    // the same sources give the same package.
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    pages.sort();
    check(Command::new("gzip").args(["-9", "-n", "-f"]).args(&pages))?;
    let completions = assets.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in [
        ("bash", "screener.bash"),
        ("zsh", "_screener"),
        ("fish", "screener.fish"),
    ] {
        let out = Command::new(&bin)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "screener completions {shell} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::write(completions.join(file), out.stdout)?;
    }
    step("building the Debian package (cargo deb)");
    let out_dir = target_dir().join("debian");
    let out = Command::new("cargo")
        .args([
            "deb",
            "-p",
            "screener",
            "--no-build",
            "--fast",
            "--profile",
            profile,
        ])
        .arg("--output")
        .arg(&out_dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot start cargo deb")?;
    if !out.status.success() {
        bail!("cargo deb failed ({})", out.status);
    }
    // cargo-deb prints the package's path last.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb named no package: {stdout}"))?;
    eprintln!("    {}", path.display());
    Ok(path)
}
