//! Key material: the master secret, its sub-keys, and the passphrase-wrapped key file.
//!
//! The master secret is 32 random bytes from the OS. Every key used elsewhere is derived
//! from it with `blake3::derive_key` under a distinct, versioned context string, so a
//! compromise of one purpose's key says nothing about another's.
//!
//! The key file stores the master secret sealed with XChaCha20-Poly1305 under a key that
//! Argon2id derives from the passphrase. Its layout is fixed (see `docs/design.md`):
//!
//! ```text
//! 0..8     magic "COFFERKF"
//! 8        format version (1)
//! 9..12    reserved, zero
//! 12..16   Argon2id memory cost, KiB (u32 LE)
//! 16..20   Argon2id time cost (u32 LE)
//! 20..24   Argon2id parallelism (u32 LE)
//! 24..40   salt (16 random bytes)
//! 40..64   nonce (24 random bytes)
//! 64..112  sealed master secret (32 bytes + 16-byte tag), AAD = bytes 0..40
//! 112..144 BLAKE3 of bytes 0..112 (tells damage apart from a wrong passphrase)
//! ```

use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::{Zeroize, Zeroizing};

/// Length in bytes of every symmetric key.
pub const KEY_LEN: usize = 32;

/// Context strings for `blake3::derive_key`. Changing one changes every derived key, so
/// they carry a version and are never edited once shipped.
pub mod context {
    /// Key for sealing chunks (XChaCha20-Poly1305).
    pub const CHUNK_SEAL: &str = "coffer 2026-11-25 v1 chunk sealing key";
    /// Key for the keyed BLAKE3 that names chunks.
    pub const CHUNK_ID: &str = "coffer 2026-11-25 v1 chunk id key";
    /// Key for sealing file manifests.
    pub const MANIFEST_SEAL: &str = "coffer 2026-11-25 v1 manifest sealing key";
    /// Key for the keyed BLAKE3 that turns a path into an opaque file id.
    pub const FILE_ID: &str = "coffer 2026-11-25 v1 file id key";
    /// Key for the keyed BLAKE3 of a file's content hash that the agent's journal records
    /// (an unkeyed hash there would confirm a guess of the content to whoever reads it).
    pub const JOURNAL_HASH: &str = "coffer 2026-12-03 v1 journal content hash key";
}

/// Errors from key handling.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the operating system's random number generator failed: {0}")]
    Rng(String),
    #[error("key file is damaged or not a Coffer key file: {0}")]
    Corrupt(&'static str),
    #[error("key file format version {0} is not supported by this build (expected 1)")]
    UnsupportedVersion(u8),
    #[error(
        "key file asks for Argon2id parameters m={m_kib} KiB, t={t}, p={p}, below the minimum \
         (m >= 19456 KiB, t >= 2, p >= 1); refusing a possibly tampered key file"
    )]
    WeakParams { m_kib: u32, t: u32, p: u32 },
    #[error(
        "key file asks for Argon2id parameters m={m_kib} KiB, t={t}, p={p}, above the maximum \
         (m <= {max_m_kib} KiB, t <= 64, p <= 64); refusing a possibly tampered key file"
    )]
    ExcessiveParams {
        m_kib: u32,
        t: u32,
        p: u32,
        /// The memory ceiling applied: [`KdfParams::MAX_M_KIB`], or less on a machine with
        /// little RAM ([`KdfParams::memory_ceiling_kib`]).
        max_m_kib: u32,
    },
    #[error("wrong passphrase (the key file is intact but does not open with this passphrase)")]
    WrongPassphrase,
    #[error("deriving the passphrase key failed: {0}")]
    Kdf(String),
    #[error("the passphrase is empty")]
    EmptyPassphrase,
}

fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut buf = [0u8; N];
    getrandom::getrandom(&mut buf).map_err(|e| KeyError::Rng(e.to_string()))?;
    Ok(buf)
}

/// Fills `buf` from the operating system's random number generator.
pub fn fill_random(buf: &mut [u8]) -> Result<(), KeyError> {
    getrandom::getrandom(buf).map_err(|e| KeyError::Rng(e.to_string()))
}

/// A 256-bit symmetric key. Zeroed on drop; never printed.
pub struct SecretKey(Zeroizing<[u8; KEY_LEN]>);

impl SecretKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A passphrase. Zeroed on drop; never printed.
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Wraps a passphrase; trailing newline characters (from a file or a prompt) are removed.
    pub fn new(mut s: String) -> Result<Self, KeyError> {
        while s.ends_with('\n') || s.ends_with('\r') {
            s.pop();
        }
        if s.is_empty() {
            s.zeroize();
            return Err(KeyError::EmptyPassphrase);
        }
        Ok(Self(Zeroizing::new(s)))
    }

    fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// The repository's master secret: the root of every key.
pub struct MasterSecret(Zeroizing<[u8; KEY_LEN]>);

impl fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterSecret(<redacted>)")
    }
}

/// The keys derived from a master secret, one per purpose.
#[derive(Debug)]
pub struct SubKeys {
    pub chunk_seal: SecretKey,
    pub chunk_id: SecretKey,
    pub manifest_seal: SecretKey,
    pub file_id: SecretKey,
    pub journal_hash: SecretKey,
}

impl MasterSecret {
    /// A fresh random master secret from the OS RNG.
    pub fn generate() -> Result<Self, KeyError> {
        Ok(Self(Zeroizing::new(random_bytes::<KEY_LEN>()?)))
    }

    /// Derives the purpose keys.
    pub fn sub_keys(&self) -> SubKeys {
        let d = |ctx: &str| SecretKey::from_bytes(blake3::derive_key(ctx, &self.0[..]));
        SubKeys {
            chunk_seal: d(context::CHUNK_SEAL),
            chunk_id: d(context::CHUNK_ID),
            manifest_seal: d(context::MANIFEST_SEAL),
            file_id: d(context::FILE_ID),
            journal_hash: d(context::JOURNAL_HASH),
        }
    }
}

/// Argon2id cost parameters as recorded in a key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfParams {
    /// Floor enforced on read: 19 MiB, two passes (OWASP's minimum for Argon2id).
    pub const MIN_M_KIB: u32 = 19 * 1024;
    pub const MIN_T: u32 = 2;
    /// Ceiling enforced on read, so a tampered file cannot exhaust the machine: Argon2id
    /// allocates all of `m` at once, and an allocation that fails aborts the process. 1 GiB
    /// is 16 times what `init` writes; [`Self::memory_ceiling_kib`] lowers it further on a
    /// machine with less than 2 GiB of RAM.
    pub const MAX_M_KIB: u32 = 1024 * 1024;
    pub const MAX_T: u32 = 64;
    pub const MAX_P: u32 = 64;

    /// Checks the parameters against the floor and the ceiling.
    pub fn check(&self) -> Result<(), KeyError> {
        self.check_within(Self::MAX_M_KIB)
    }

    /// Checks the parameters against the floor and the ceiling, with the memory ceiling
    /// lowered to `max_m_kib` (never raised above [`Self::MAX_M_KIB`]).
    pub fn check_within(&self, max_m_kib: u32) -> Result<(), KeyError> {
        let (m_kib, t, p) = (self.m_kib, self.t, self.p);
        let max_m_kib = max_m_kib.min(Self::MAX_M_KIB);
        if m_kib < Self::MIN_M_KIB || t < Self::MIN_T || p < 1 {
            return Err(KeyError::WeakParams { m_kib, t, p });
        }
        if m_kib > max_m_kib || t > Self::MAX_T || p > Self::MAX_P {
            return Err(KeyError::ExcessiveParams {
                m_kib,
                t,
                p,
                max_m_kib,
            });
        }
        Ok(())
    }

    /// The memory ceiling on a machine with `ram_bytes` of RAM: half of it, at most
    /// [`Self::MAX_M_KIB`] (that alone when the RAM is unknown), at least the floor.
    pub fn memory_ceiling_kib(ram_bytes: Option<u64>) -> u32 {
        let half = ram_bytes.map_or(u64::MAX, |b| b / 2 / 1024);
        half.clamp(Self::MIN_M_KIB as u64, Self::MAX_M_KIB as u64) as u32
    }
}

impl Default for KdfParams {
    /// 64 MiB, three passes, one lane.
    fn default() -> Self {
        Self {
            m_kib: 64 * 1024,
            t: 3,
            p: 1,
        }
    }
}

const MAGIC: &[u8; 8] = b"COFFERKF";
const VERSION: u8 = 1;
/// Total length of a key file in bytes.
pub const KEY_FILE_LEN: usize = 144;
const AAD_END: usize = 40;
const SEALED_START: usize = 64;
const SUM_START: usize = 112;

fn passphrase_key(
    pass: &Passphrase,
    salt: &[u8; 16],
    params: KdfParams,
) -> Result<SecretKey, KeyError> {
    let p = argon2::Params::new(params.m_kib, params.t, params.p, Some(KEY_LEN))
        .map_err(|e| KeyError::Kdf(e.to_string()))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    a.hash_password_into(pass.as_bytes(), salt, &mut out[..])
        .map_err(|e| KeyError::Kdf(e.to_string()))?;
    Ok(SecretKey(out))
}

/// Seals the master secret under the passphrase, producing key-file bytes.
pub fn wrap_master(
    master: &MasterSecret,
    pass: &Passphrase,
    params: KdfParams,
) -> Result<Vec<u8>, KeyError> {
    params.check()?;
    let salt = random_bytes::<16>()?;
    let nonce = random_bytes::<24>()?;
    let mut out = Vec::with_capacity(KEY_FILE_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&params.m_kib.to_le_bytes());
    out.extend_from_slice(&params.t.to_le_bytes());
    out.extend_from_slice(&params.p.to_le_bytes());
    out.extend_from_slice(&salt);
    out.extend_from_slice(&nonce);
    let key = passphrase_key(pass, &salt, params)?;
    let cipher = XChaCha20Poly1305::new(key.as_bytes().into());
    let sealed = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &master.0[..],
                aad: &out[..AAD_END],
            },
        )
        .map_err(|_| KeyError::Kdf("sealing the master secret failed".into()))?;
    out.extend_from_slice(&sealed);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    debug_assert_eq!(out.len(), KEY_FILE_LEN);
    Ok(out)
}

/// Reads the KDF parameters of a key file after checking its structure (no passphrase needed).
pub fn key_file_params(bytes: &[u8]) -> Result<KdfParams, KeyError> {
    if bytes.len() != KEY_FILE_LEN {
        return Err(KeyError::Corrupt("wrong length (expected 144 bytes)"));
    }
    if &bytes[..8] != MAGIC {
        return Err(KeyError::Corrupt("bad magic"));
    }
    if blake3::hash(&bytes[..SUM_START]).as_bytes() != &bytes[SUM_START..] {
        return Err(KeyError::Corrupt("checksum mismatch"));
    }
    if bytes[8] != VERSION {
        return Err(KeyError::UnsupportedVersion(bytes[8]));
    }
    if bytes[9..12] != [0, 0, 0] {
        return Err(KeyError::Corrupt("reserved bytes are not zero"));
    }
    let u = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&bytes[at..at + 4]);
        u32::from_le_bytes(b)
    };
    let params = KdfParams {
        m_kib: u(12),
        t: u(16),
        p: u(20),
    };
    params.check()?;
    Ok(params)
}

/// Opens a key file with the passphrase, returning the master secret.
///
/// A damaged file (`Corrupt`), out-of-range parameters and a wrong passphrase are told apart.
pub fn unwrap_master(bytes: &[u8], pass: &Passphrase) -> Result<MasterSecret, KeyError> {
    let params = key_file_params(bytes)?;
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&bytes[24..40]);
    let key = passphrase_key(pass, &salt, params)?;
    let cipher = XChaCha20Poly1305::new(key.as_bytes().into());
    let plain = Zeroizing::new(
        cipher
            .decrypt(
                XNonce::from_slice(&bytes[40..64]),
                Payload {
                    msg: &bytes[SEALED_START..SUM_START],
                    aad: &bytes[..AAD_END],
                },
            )
            .map_err(|_| KeyError::WrongPassphrase)?,
    );
    let mut secret = Zeroizing::new([0u8; KEY_LEN]);
    if plain.len() != KEY_LEN {
        return Err(KeyError::Corrupt("sealed secret has the wrong length"));
    }
    secret.copy_from_slice(&plain);
    Ok(MasterSecret(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> KdfParams {
        KdfParams {
            m_kib: KdfParams::MIN_M_KIB,
            t: 2,
            p: 1,
        }
    }

    fn pass(s: &str) -> Passphrase {
        Passphrase::new(s.to_string()).expect("non-empty")
    }

    #[test]
    fn round_trip_restores_the_same_sub_keys() {
        let m = MasterSecret::generate().expect("rng");
        let file = wrap_master(&m, &pass("correct horse"), fast()).expect("wrap");
        assert_eq!(file.len(), KEY_FILE_LEN);
        let back = unwrap_master(&file, &pass("correct horse")).expect("unwrap");
        assert_eq!(
            back.sub_keys().chunk_id.as_bytes(),
            m.sub_keys().chunk_id.as_bytes()
        );
        assert_eq!(
            back.sub_keys().file_id.as_bytes(),
            m.sub_keys().file_id.as_bytes()
        );
    }

    #[test]
    fn sub_keys_are_distinct() {
        let k = MasterSecret::generate().expect("rng").sub_keys();
        let all = [
            &k.chunk_seal,
            &k.chunk_id,
            &k.manifest_seal,
            &k.file_id,
            &k.journal_hash,
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.as_bytes(), b.as_bytes());
            }
        }
    }

    #[test]
    fn wrong_passphrase_is_its_own_error() {
        let m = MasterSecret::generate().expect("rng");
        let file = wrap_master(&m, &pass("right"), fast()).expect("wrap");
        assert!(matches!(
            unwrap_master(&file, &pass("wrong")),
            Err(KeyError::WrongPassphrase)
        ));
    }

    #[test]
    fn every_tampered_field_is_refused() {
        let m = MasterSecret::generate().expect("rng");
        let file = wrap_master(&m, &pass("pw"), fast()).expect("wrap");
        // Flipping any byte without fixing the checksum is detected as damage.
        for at in 0..KEY_FILE_LEN {
            let mut bad = file.clone();
            bad[at] ^= 0x01;
            let err = unwrap_master(&bad, &pass("pw")).err();
            assert!(
                matches!(err, Some(KeyError::Corrupt(_))),
                "byte {at}: {err:?}"
            );
        }
        // A tamperer who also fixes the checksum: each field still fails, never opens.
        let reseal = |mut b: Vec<u8>| {
            let sum = blake3::hash(&b[..SUM_START]);
            b[SUM_START..].copy_from_slice(sum.as_bytes());
            b
        };
        let mut v = file.clone();
        v[8] = 2;
        assert!(matches!(
            unwrap_master(&reseal(v), &pass("pw")),
            Err(KeyError::UnsupportedVersion(2))
        ));
        let mut weak = file.clone();
        weak[12..16].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(
            unwrap_master(&reseal(weak), &pass("pw")),
            Err(KeyError::WeakParams { .. })
        ));
        let mut weak_t = file.clone();
        weak_t[16..20].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            unwrap_master(&reseal(weak_t), &pass("pw")),
            Err(KeyError::WeakParams { .. })
        ));
        let mut huge = file.clone();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            unwrap_master(&reseal(huge), &pass("pw")),
            Err(KeyError::ExcessiveParams { .. })
        ));
        // Raising t within bounds is authenticated (AAD) and so cannot open either.
        let mut t3 = file.clone();
        t3[16..20].copy_from_slice(&3u32.to_le_bytes());
        assert!(unwrap_master(&reseal(t3), &pass("pw")).is_err());
        for range in [24..40, 40..64, 64..112] {
            let mut b = file.clone();
            b[range.start] ^= 0x80;
            assert!(matches!(
                unwrap_master(&reseal(b), &pass("pw")),
                Err(KeyError::WrongPassphrase)
            ));
        }
        assert!(matches!(
            unwrap_master(&file[..100], &pass("pw")),
            Err(KeyError::Corrupt(_))
        ));
    }

    /// A key file asking Argon2id for more memory than the ceiling (the old 4 GiB one
    /// included) is refused with an error naming its parameters, by the structural check
    /// that comes before Argon2id: nothing is allocated, the process does not abort.
    #[test]
    fn memory_above_the_ceiling_is_refused_before_argon2id_runs() {
        let m = MasterSecret::generate().expect("rng");
        let file = wrap_master(&m, &pass("pw"), fast()).expect("wrap");
        let reseal = |mut b: Vec<u8>| {
            let sum = blake3::hash(&b[..SUM_START]);
            b[SUM_START..].copy_from_slice(sum.as_bytes());
            b
        };
        for m_kib in [1024 * 1024 + 1, 2 * 1024 * 1024, 4 * 1024 * 1024u32] {
            let mut b = file.clone();
            b[12..16].copy_from_slice(&m_kib.to_le_bytes());
            let b = reseal(b);
            let e = key_file_params(&b).expect_err("above the ceiling");
            let text = e.to_string();
            assert!(matches!(e, KeyError::ExcessiveParams { .. }), "{text}");
            assert!(text.contains(&format!("m={m_kib} KiB, t=2, p=1")), "{text}");
            assert!(text.contains("1048576 KiB"), "names the ceiling: {text}");
            // Opening checks the same first, so Argon2id never runs with these.
            assert!(matches!(
                unwrap_master(&b, &pass("pw")),
                Err(KeyError::ExcessiveParams { .. })
            ));
        }
        // The ceiling itself is accepted (the check is not off by one).
        let mut at = file.clone();
        at[12..16].copy_from_slice(&KdfParams::MAX_M_KIB.to_le_bytes());
        assert!(key_file_params(&reseal(at)).is_ok());
    }

    #[test]
    fn the_memory_ceiling_is_half_the_ram_at_most_1_gib() {
        let gib = 1u64 << 30;
        assert_eq!(KdfParams::memory_ceiling_kib(None), KdfParams::MAX_M_KIB);
        assert_eq!(KdfParams::memory_ceiling_kib(Some(64 * gib)), 1024 * 1024);
        assert_eq!(KdfParams::memory_ceiling_kib(Some(gib)), 512 * 1024);
        assert_eq!(
            KdfParams::memory_ceiling_kib(Some(1 << 20)),
            KdfParams::MIN_M_KIB
        );
        let p = KdfParams {
            m_kib: 600 * 1024,
            t: 3,
            p: 1,
        };
        assert!(p.check().is_ok());
        let e = p
            .check_within(KdfParams::memory_ceiling_kib(Some(gib)))
            .expect_err("above half of 1 GiB");
        assert!(
            e.to_string()
                .contains("m=614400 KiB, t=3, p=1, above the maximum (m <= 524288 KiB"),
            "{e}"
        );
        // A ceiling is only ever lowered.
        assert!(p.check_within(u32::MAX).is_ok());
        let huge = KdfParams {
            m_kib: 2 * 1024 * 1024,
            ..p
        };
        assert!(huge.check_within(u32::MAX).is_err());
    }

    #[test]
    fn debug_never_prints_secrets() {
        let k = MasterSecret::generate().expect("rng");
        assert_eq!(format!("{k:?}"), "MasterSecret(<redacted>)");
        assert!(format!("{:?}", k.sub_keys()).contains("redacted"));
        assert!(!format!("{:?}", pass("hunter2")).contains("hunter2"));
    }

    #[test]
    fn empty_passphrase_is_refused() {
        assert!(matches!(
            Passphrase::new("\n".into()),
            Err(KeyError::EmptyPassphrase)
        ));
    }
}
