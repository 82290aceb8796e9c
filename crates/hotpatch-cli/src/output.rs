//! The command's answer on stdout, written without panicking.
//!
//! `println!` panics when stdout is a closed pipe or a full disk — after a
//! patch was applied, so a script seeing exit code 101 could apply it
//! again. Every command builds its answer as text and hands it here; a
//! failed write becomes [`Unwritten`], which says what was done anyway
//! and makes the tool exit with [`EXIT_UNWRITTEN`].

use std::fmt;
use std::io::Write;

/// Exit code: the command did its work but its output could not be written.
pub const EXIT_UNWRITTEN: u8 = 3;

/// Stdout could not be written. What the command did stands.
#[derive(Debug)]
pub struct Unwritten {
    /// What was done before the write failed ("patch 3 WAS applied to
    /// process 42"), when something was.
    pub done: Option<String>,
    pub source: std::io::Error,
}

impl fmt::Display for Unwritten {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.done {
            Some(done) => write!(
                f,
                "{done}, but its output could not be written to stdout: {}",
                self.source
            ),
            None => write!(f, "the output could not be written to stdout: {}", self.source),
        }
    }
}

impl std::error::Error for Unwritten {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Write `text` to stdout and flush it. `done` says what the command did,
/// for the message if the write fails.
pub fn emit(text: &str, done: impl FnOnce() -> Option<String>) -> Result<(), Unwritten> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| Unwritten { done: done(), source })
}

/// One line to stdout (for commands that report as they go).
pub fn line(args: fmt::Arguments<'_>) -> Result<(), Unwritten> {
    emit(&format!("{args}\n"), || None)
}

/// A message on stderr; a failure to write it is ignored (there is nowhere
/// left to say it).
pub fn warn(message: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{message}");
    let _ = err.flush();
}

/// `println!` that returns [`Unwritten`] through `?` instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))?
    };
}
pub(crate) use say;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_says_what_was_done() {
        let e = Unwritten {
            done: Some("patch 3 WAS applied to process 42".into()),
            source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("patch 3 WAS applied to process 42, but its output could not be written"),
            "{msg}"
        );
        assert!(msg.contains("broken pipe"), "{msg}");
    }
}
