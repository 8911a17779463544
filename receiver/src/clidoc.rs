//! Shell completions and the man page, generated from the command line's clap definition
//! (`coffer-receiver completions SHELL` and `coffer-receiver man`, which
//! `packaging/build-deb.sh` runs).
//!
//! In the library, like [`crate::cli`], so that every build of the command line (including
//! the tests crate's `coffer-receiver-test`) needs no generator crates of its own.

use std::io::Write;

pub use clap_complete::Shell;

/// Writes `shell`'s completion script for `cmd` to `out`.
pub fn completions(
    shell: Shell,
    cmd: &mut clap::Command,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    // Rendered in memory first: the generator panics on a write error (a closed pipe).
    let mut buf = Vec::new();
    clap_complete::generate(shell, cmd, name, &mut buf);
    out.write_all(&buf)?;
    out.flush()
}

/// Writes the roff man page for `cmd` to `out`.
pub fn man(cmd: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(cmd).render(out)?;
    out.flush()
}
