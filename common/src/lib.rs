//! coffer-common: the pieces both ends of Coffer share, with no I/O policy of their own.
//!
//! - [`aead`]: XChaCha20-Poly1305 for bulk data (HChaCha20 + ring's ChaCha20-Poly1305).
//! - [`keys`]: the master secret, its purpose sub-keys, and the passphrase-wrapped key file.
//! - [`chunk`]: content-defined chunking, keyed chunk and file ids, sealing and opening.
//! - [`manifest`]: what the agent records about one version of a file (sealed before sending).
//! - [`wire`]: the protocol's one message enum and its frame limits.
//! - [`channel`]: the Noise XX secure channel with pinned static keys that carries messages.

pub mod aead;
pub mod channel;
pub mod chunk;
pub mod keys;
pub mod manifest;
pub mod wire;

/// This build's version, as reported in `Hello` and `--version`.
pub const SOFTWARE: &str = concat!("coffer ", env!("CARGO_PKG_VERSION"));
