//! Machine-readable lines on stdout: where the servers listen, the first admin key.
//! Tests and scripts read them, so they are written whole and flushed at once.

/// Writes `text` and a newline on stdout, flushed; false when stdout is gone (a closed
/// pipe), which never stops the server.
pub fn announce(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush()).is_ok()
}
