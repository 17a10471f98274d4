//! What a Rust test suite does when a tool or data it needs is missing (as scripts/suite.sh
//! does for the shell suites). Shared by the server and operator tests through `#[path]`.

use std::io::Write;

/// Under `CI=true`, fails with one line naming what is missing: nothing may pass by not
/// running. Elsewhere prints `SKIPPED: <suite>: <reason>` and appends `<suite>: <reason>` to
/// `$CHORUS_SKIP_LOG` (if set), so that scripts/test.sh lists the skip at the end.
pub fn cannot_run(suite: &str, reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{suite} cannot run under CI=true: {reason}");
    }
    eprintln!("SKIPPED: {suite}: {reason}");
    let Some(log) = std::env::var_os("CHORUS_SKIP_LOG").filter(|l| !l.is_empty()) else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .and_then(|mut f| writeln!(f, "{suite}: {reason}"));
    if let Err(e) = written {
        eprintln!(
            "cannot append to CHORUS_SKIP_LOG {}: {e}",
            log.to_string_lossy()
        );
    }
}
