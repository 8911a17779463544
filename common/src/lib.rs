//! coffer-common: the pieces both ends of Coffer share, with no I/O policy of their own.
//!
//! - [`aead`]: XChaCha20-Poly1305 for bulk data (HChaCha20 + ring's ChaCha20-Poly1305).
//! - [`keys`]: the master secret, its purpose sub-keys, and the passphrase-wrapped key file.
//! - [`chunk`]: content-defined chunking, keyed chunk and file ids, sealing and opening.
//! - [`manifest`]: what the agent records about one version of a file (sealed before sending).
//! - [`wire`]: the protocol's one message enum and its frame limits.
//! - [`channel`]: the Noise XX secure channel with pinned static keys that carries messages.
//! - [`host`] (feature `host`): what both daemons need from the operating system (see its map).
//!
//! This file holds [`error_text`] (an error chain as one line) and [`SOFTWARE`].

pub mod aead;
pub mod channel;
pub mod chunk;
#[cfg(feature = "host")]
pub mod host;
pub mod keys;
pub mod manifest;
pub mod wire;

/// This build's version, as reported in `Hello` and `--version`.
pub const SOFTWARE: &str = concat!("coffer ", env!("CARGO_PKG_VERSION"));

/// An error and its causes as one line, `outer: cause: cause`, for the command line. A
/// cause whose text the line already holds is left out: most errors here name their cause
/// in their own message (`reading config agent.toml: No such file or directory`), and
/// printing the chain as well said it twice. The comparison ignores case and the
/// `(os error N)` suffix, since an error that names its path may word its cause in
/// lower case (`reading /srv/x: permission denied`).
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !plain(&line).contains(&plain(&text)) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// `text` in lower case without an `(os error N)` suffix, for comparing error texts.
fn plain(text: &str) -> String {
    let text = match text.find(" (os error ") {
        Some(i) => &text[..i],
        None => text,
    };
    text.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    #[error("reading config {path}: {source}")]
    struct Named {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let named = Named {
            path: "agent.toml".into(),
            source: io(),
        };
        assert_eq!(
            error_text(&named),
            "reading config agent.toml: No such file"
        );
        // A context that does not name its cause gets it appended, once.
        let ctx = anyhow::Error::new(io()).context("loading keys");
        assert_eq!(error_text(ctx.as_ref()), "loading keys: No such file");
        let both = anyhow::Error::new(named).context("starting");
        assert_eq!(
            error_text(both.as_ref()),
            "starting: reading config agent.toml: No such file"
        );
        // A cause worded in lower case and without its `(os error N)` (as
        // `host::fs::IoError` words it) is the same cause.
        #[derive(Debug, thiserror::Error)]
        #[error("opening lock file /r/serve.lock: is a directory")]
        struct Lower(#[source] std::io::Error);
        let lower = Lower(std::io::Error::from_raw_os_error(libc_eisdir()));
        assert_eq!(
            error_text(&lower),
            "opening lock file /r/serve.lock: is a directory"
        );
    }

    /// EISDIR, whose text is "Is a directory" on Linux.
    fn libc_eisdir() -> i32 {
        21
    }
}
