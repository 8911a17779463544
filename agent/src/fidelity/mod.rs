//! Files as the system holds them, beyond their bytes: sparse files' holes ([`sparse`]),
//! hard links and the reads they share ([`links`]), extended attributes and ACLs
//! ([`xattr`]), and FIFOs, sockets and device nodes ([`special`]).

pub mod links;
pub mod sparse;
pub mod special;
pub mod xattr;

use coffer_common::manifest::{Extent, HardLink, Xattr};

/// What a file version records besides its content and basic metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extra {
    pub sparse: Option<Vec<Extent>>,
    pub xattrs: Vec<Xattr>,
    pub hardlink: Option<HardLink>,
}

impl Extra {
    /// What tells one version of a file apart from another (the journal keeps its keyed
    /// hash): the plain content hash alone for a file without attributes or links (so the
    /// journals of earlier releases keep matching), else a BLAKE3 of the content hash, the
    /// attributes and the inode it shares. Which path a link's read came from, and the
    /// holes, are left out: neither changes what is restored.
    pub fn summary(&self, content: &[u8; 32]) -> [u8; 32] {
        if self.xattrs.is_empty() && self.hardlink.is_none() {
            return *content;
        }
        let mut h = blake3::Hasher::new();
        h.update(b"coffer 2026-12-03 file summary v2\0");
        h.update(content);
        h.update(&xattr::digest(&self.xattrs));
        if let Some(l) = &self.hardlink {
            h.update(b"link");
            h.update(&l.dev.to_le_bytes());
            h.update(&l.ino.to_le_bytes());
        }
        *h.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file without attributes or links is summarised by its content hash, as before
    /// format 2; an attribute or a link changes the summary, the link's path does not.
    #[test]
    fn the_summary_changes_with_attributes_and_links_only() {
        let c = [7u8; 32];
        let mut e = Extra::default();
        assert_eq!(e.summary(&c), c);
        e.sparse = Some(vec![Extent { offset: 0, len: 1 }]);
        assert_eq!(e.summary(&c), c);
        e.xattrs = vec![Xattr {
            name: b"user.a".to_vec(),
            value: b"1".to_vec(),
        }];
        let with_attr = e.summary(&c);
        assert_ne!(with_attr, c);
        e.xattrs[0].value = b"2".to_vec();
        assert_ne!(e.summary(&c), with_attr);
        e.hardlink = Some(HardLink {
            dev: 1,
            ino: 2,
            to: vec![],
        });
        let linked = e.summary(&c);
        e.hardlink = Some(HardLink {
            dev: 1,
            ino: 2,
            to: b"w/other".to_vec(),
        });
        assert_eq!(e.summary(&c), linked);
    }
}
