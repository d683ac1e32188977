//! `eventbus completions` and `eventbus man`, run as the built binary: each prints something
//! its consumer (the shell, man) takes, naming the real commands and flags.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_eventbus");

fn run(args: &[&str]) -> Output {
    let output = Command::new(BIN).args(args).output().expect("run eventbus");
    assert!(
        output.status.success(),
        "eventbus {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn completions_name_the_commands_and_flags_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F _eventbus"),
        ("zsh", "#compdef eventbus"),
        ("fish", "complete -c eventbus"),
    ] {
        let script = stdout(&run(&["completions", shell]));
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        for word in ["publish", "subscribe", "server", "groups", "--cloudevent"] {
            assert!(script.contains(word), "{shell}: no {word:?}");
        }
    }
    // A shell that is not one is refused.
    let output = Command::new(BIN)
        .args(["completions", "cmd.exe"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

/// bash itself reads the script: it parses, and defines the completion function.
#[test]
fn bash_accepts_its_completion_script() {
    if Command::new("bash").arg("--version").output().is_err() {
        eprintln!("no bash here; skipped");
        return;
    }
    let script = stdout(&run(&["completions", "bash"]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eventbus.bash");
    std::fs::write(&path, script).unwrap();
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p eventbus", path.display()))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout(&output).contains("_eventbus"), "{}", stdout(&output));
}

#[test]
fn man_prints_a_roff_page_and_writes_one_per_command() {
    let page = stdout(&run(&["man"]));
    assert!(page.starts_with(".ie"), "{}", &page[..page.len().min(200)]);
    assert!(page.contains(".TH eventbus 1"), "no .TH header");
    assert!(page.contains("publish"), "no publish command");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let listed = stdout(&run(&["man", "--dir", out.to_str().unwrap()]));
    for name in [
        "eventbus.1",
        "eventbus-publish.1",
        "eventbus-server.1",
        "eventbus-server-check.1",
    ] {
        let path = out.join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(text.contains(".TH"), "{name} has no .TH");
        assert!(listed.contains(name), "{name} not listed in {listed}");
    }
    let check = std::fs::read_to_string(out.join("eventbus-server-check.1")).unwrap();
    assert!(check.contains("max\\-group\\-pending\\-warn"), "{check}");

    // Where groff is installed, it renders the page: the flags come out as text.
    if let Ok(rendered) = Command::new("groff")
        // Plain ASCII: no overstrike for bold, no underlining.
        .args(["-man", "-Tascii", "-P-c", "-P-b", "-P-o", "-P-u"])
        .arg(out.join("eventbus-server-check.1"))
        .output()
    {
        assert!(rendered.status.success());
        let text = String::from_utf8_lossy(&rendered.stdout);
        assert!(text.contains("--max-group-pending-warn"), "{text}");
    }
}
