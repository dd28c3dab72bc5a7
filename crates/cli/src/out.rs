//! Standard output for the commands that keep SIGPIPE ignored (`train`, `launch`, `dist-check`,
//! `bench-ep`: their sockets and children must see EPIPE as an error, not die of a signal).
//! `println!` panics when stdout is a closed pipe (`lockstep train | head -1`); these write
//! best-effort instead: a closed or failing stdout ends the printing, never the run.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Write `args` to stdout; after the first failed write, nothing more is attempted.
pub fn write(args: std::fmt::Arguments) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if out.write_fmt(args).and_then(|_| out.flush()).is_err() {
        CLOSED.store(true, Ordering::Relaxed);
    }
}

/// `println!` that survives a closed stdout.
macro_rules! say {
    () => { $crate::out::write(format_args!("\n")) };
    ($($t:tt)*) => { $crate::out::write(format_args!("{}\n", format_args!($($t)*))) };
}

/// `print!` that survives a closed stdout.
macro_rules! say_raw {
    ($($t:tt)*) => { $crate::out::write(format_args!($($t)*)) };
}

pub(crate) use {say, say_raw};
