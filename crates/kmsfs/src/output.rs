//! `--quiet`: what a command prints besides its errors, warnings and the
//! output it exists for (listings, reports, `--json`) is informational —
//! confirmations, summaries, progress — and `--quiet` silences it.
//!
//! The flag is global state set once by the binary before it dispatches,
//! so that commands and the helpers they share need no extra parameter.

use std::sync::atomic::{AtomicBool, Ordering};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Turns informational output off (`--quiet`) or on.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// True under `--quiet`.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// `println!` unless `--quiet`: for confirmations and summaries on stdout.
#[macro_export]
macro_rules! info_println {
    ($($arg:tt)*) => {
        if !$crate::output::quiet() {
            println!($($arg)*);
        }
    };
}

/// `eprintln!` unless `--quiet`: for notes and progress on stderr.
#[macro_export]
macro_rules! info_eprintln {
    ($($arg:tt)*) => {
        if !$crate::output::quiet() {
            eprintln!($($arg)*);
        }
    };
}
