//! The binary starts and describes its flags. (Having an integration test also makes
//! `cargo test --workspace` build the binary before any test runs, which the end-to-end tests in
//! `scenario-tests` rely on.)

use std::process::Command;

#[test]
fn help_lists_the_flags() {
    let output = Command::new(env!("CARGO_BIN_EXE_product-service"))
        .arg("--help")
        .output()
        .expect("run product-service");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in ["--bus", "--db", "EVENTBUS_SERVER"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}
