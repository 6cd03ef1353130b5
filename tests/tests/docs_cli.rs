//! The documentation the binary carries: `config show --describe`, the
//! manual pages it writes for packaging, and the shell completions.

use std::{path::Path, process::Command};

use integration_tests::netns::screener_bin;

/// Runs `screener ARGS` (no configuration file needed); panics on failure.
#[track_caller]
fn run(args: &[&str]) -> String {
    let out = Command::new(screener_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "screener {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every `section.key` that `config show -d` lists.
fn keys() -> Vec<String> {
    run(&["-c", "/dev/null", "config", "show", "-d"])
        .lines()
        .map(|l| l.split_once(" = ").expect("name = value").0.to_owned())
        .collect()
}

#[test]
fn describe_puts_text_and_postscreen_name_under_every_key() {
    let keys = keys();
    assert!(keys.len() > 50, "{keys:?}");
    let out = run(&["-c", "/dev/null", "config", "show", "-d", "--describe"]);
    // One block per key: its line, indented text, a blank line.
    let blocks: Vec<&str> = out.split("\n\n").filter(|b| !b.is_empty()).collect();
    assert_eq!(blocks.len(), keys.len(), "{out}");
    for (block, key) in blocks.iter().zip(&keys) {
        let mut lines = block.lines();
        let head = lines.next().unwrap();
        assert!(head.starts_with(&format!("{key} = ")), "{block}");
        let text: Vec<&str> = lines.collect();
        assert!(!text.is_empty(), "{key} has no description");
        assert!(text.iter().all(|l| l.starts_with("    ")), "{block}");
    }
    assert!(
        out.contains(
            "screen.greet_wait = 6s\n    How long the pregreet test waits after the teaser."
        ),
        "{out}"
    );
    assert!(
        out.contains("    postscreen: postscreen_greet_wait\n"),
        "{out}"
    );
    // Works on named keys and on the file's values too.
    let one = run(&[
        "-c",
        "/dev/null",
        "config",
        "show",
        "--describe",
        "verdict.block_on",
    ]);
    assert!(one.starts_with("verdict.block_on = [\""), "{one}");
    assert!(one.contains("[] blocks nothing"), "{one}");
}

#[test]
fn manpages_cover_every_subcommand_and_every_key() {
    let dir = tempfile::tempdir().unwrap();
    run(&["manpages", dir.path().to_str().unwrap()]);
    let page = |name: &str| {
        std::fs::read_to_string(dir.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let top = page("screener.1");
    assert!(top.contains(".TH screener 1"), "{top}");
    for sub in [
        "run",
        "config",
        "config-check",
        "config-show",
        "config-set",
        "block-add",
        "block-del",
        "block-list",
        "allow-add",
        "cache-purge",
        "stats",
        "xdp-status",
        "xdp-detach",
        "store-check",
        "store-repair",
        "import",
        "completions",
    ] {
        let p = page(&format!("screener-{sub}.1"));
        assert!(p.contains(".SH NAME"), "screener-{sub}.1: {p}");
    }
    assert!(page("screener-config-show.1").contains("describe"));
    // The packaging helper is no part of the manual.
    assert!(!dir.path().join("screener-manpages.1").exists());
    assert!(!top.contains("manpages"), "{top}");

    let five = page("screener.toml.5");
    assert!(five.starts_with(".TH SCREENER.TOML 5"), "{five}");
    for key in keys() {
        assert!(
            five.contains(&format!(".B {key}\n")),
            "{key} not in screener.toml.5"
        );
    }
    assert!(five.contains("postscreen: postscreen_dnsbl_sites"));
    render(&dir.path().join("screener.toml.5"));
}

/// Formats a page with groff when man-db is installed, failing on any
/// warning; without man-db only the text checks above apply.
fn render(page: &Path) {
    let Ok(out) = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(page)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .output()
    else {
        eprintln!("man is not installed: the page is not rendered");
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("screen.greet_wait"), "{text}");
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("complete -F _screener"), "{bash}");
    // The script parses.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("screener.bash");
    std::fs::write(&file, &bash).unwrap();
    let st = Command::new("bash").arg("-n").arg(&file).status().unwrap();
    assert!(st.success(), "bash -n on the completion script");
    let zsh = run(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef screener"), "{zsh}");
    let fish = run(&["completions", "fish"]);
    assert!(fish.contains("complete -c screener"), "{fish}");
    for script in [&bash, &zsh, &fish] {
        for word in ["block", "allow", "config", "xdp", "completions", "describe"] {
            assert!(script.contains(word), "{word} missing");
        }
        assert!(!script.contains("manpages"));
    }
    let out = Command::new(screener_bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[possible values: bash, zsh, fish]"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
