//! The CLI refuses values that would overflow or reject everyone, naming
//! the key (or option) and the bound, and never panics on an operator's
//! input.

use std::{path::Path, process::Command};

use integration_tests::netns::screener_bin;

/// Runs `screener -c cfg ARGS`: (exit code, stdout + stderr).
fn run(cfg: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(screener_bin())
        .arg("-c")
        .arg(cfg)
        .args(args)
        .output()
        .expect("run screener");
    (
        // A signal (no code) counts as a crash.
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A refusal: exit status 1 or clap's 2, never 0 nor a panic's 101.
#[track_caller]
fn refused(code: i32, out: &str) {
    assert!(code == 1 || code == 2, "exit {code}: {out}");
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn a_ttl_beyond_ten_years_is_refused_before_anything_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    // No daemon runs: a refused option never gets as far as asking one.
    let cfg = dir.path().join("screener.toml");
    let list = dir.path().join("list.txt");
    std::fs::write(&list, "192.0.2.0/24\n").unwrap();
    let list = list.to_str().unwrap();
    for args in [
        &[
            "block",
            "add",
            "192.0.2.9",
            "--ttl",
            "18446744073709551615s",
        ][..],
        &["block", "add", "192.0.2.9", "--ttl", "3651d"],
        &["import", list, "--ttl", "99999999999999999999d"],
    ] {
        let (code, out) = run(&cfg, args);
        refused(code, &out);
        assert!(out.contains("--ttl"), "{args:?}: {out}");
        assert!(out.contains("at most 3650d"), "{args:?}: {out}");
        assert!(!out.contains("blocked"), "{args:?}: {out}");
    }
    for ttl in ["500ms", "0s", "1500ms"] {
        let (code, out) = run(&cfg, &["block", "add", "192.0.2.9", "--ttl", ttl]);
        refused(code, &out);
        assert!(out.contains("at least 1s"), "{ttl}: {out}");
    }
}

#[test]
fn config_check_refuses_overflowing_durations_naming_key_and_bound() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("screener.toml");
    for (text, key, bound) in [
        (
            "[screen]\ngreet_wait = \"18446744073709551615s\"\n",
            "screen.greet_wait",
            "at most 3650d",
        ),
        (
            "[screen]\ngreet_wait = \"10m\"\n",
            "screen.greet_wait",
            "at most 1m",
        ),
        (
            "[verdict]\nblock_ttl_max = \"18446744073709551615s\"\n",
            "verdict.block_ttl_max",
            "at most 3650d",
        ),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let (code, out) = run(&cfg, &["config", "check"]);
        refused(code, &out);
        assert!(out.contains(key), "{text}: {out}");
        assert!(out.contains(bound), "{text}: {out}");
    }
}

#[test]
fn config_set_on_a_section_that_is_not_a_table_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("screener.toml");
    std::fs::write(&cfg, "screen = \"x\"\n").unwrap();
    let (code, out) = run(&cfg, &["config", "set", "screen.greet_wait=2s"]);
    refused(code, &out);
    assert!(out.contains("screen"), "{out}");
    assert!(out.contains("expected a [section]"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        "screen = \"x\"\n",
        "the file is left alone"
    );

    // And an overflowing value is refused by `set` too, file untouched.
    std::fs::write(&cfg, "[screen]\ngreet_wait = \"6s\"\n").unwrap();
    let (code, out) = run(
        &cfg,
        &["config", "set", "screen.greet_wait=18446744073709551615s"],
    );
    refused(code, &out);
    assert!(
        out.contains("screen.greet_wait") && out.contains("at most 3650d"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        "[screen]\ngreet_wait = \"6s\"\n"
    );
}

#[test]
fn config_check_refuses_a_dnsbl_threshold_of_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("screener.toml");
    std::fs::write(
        &cfg,
        "[screen]\ndnsbl_sites = [\"bl.example\"]\ndnsbl_threshold = 0\n",
    )
    .unwrap();
    let (code, out) = run(&cfg, &["config", "check"]);
    refused(code, &out);
    assert!(out.contains("screen.dnsbl_threshold"), "{out}");
    assert!(out.contains("at least 1"), "{out}");

    // A value that works but is suspicious passes, with a warning naming it.
    std::fs::write(
        &cfg,
        "[screen]\naccess_list = [\"permit 192.0.2.0/24\", \"reject ::/0\"]\n\
         [daemon]\nuser = \"root\"\n",
    )
    .unwrap();
    let (code, out) = run(&cfg, &["config", "check"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: screen.access_list: \"reject ::/0\" rejects every client"),
        "{out}"
    );
}
