//! The salvaging scan `repair` reads packs with: unlike [`crate::store::scan`], which stops
//! at the first record that is not whole and intact (after it, recovery cuts a torn tail),
//! it reads past damage to every intact record a pack still holds.
//!
//! - A record whose header decodes and is followed by another whole record's header, but
//!   whose body does not match its hash, is [`Salvaged::Damaged`] and skipped by its
//!   length.
//! - Bytes where no header decodes (or a header whose length leads nowhere) are
//!   [`Salvaged::Unreadable`]: the scan searches forward for the next offset where a record
//!   of either kind validates (magic, sane length, within the pack, body matching its
//!   BLAKE3) and goes on from there.
//! - What follows the last intact record, when nothing validates in it, is a torn tail:
//!   the scan returns where it starts, and the caller cuts it as recovery does. A whole
//!   last record that does not match its hash is handed over as damaged first (it may be
//!   bit rot in the newest record), then cut with the tail.
//!
//! One record's body (and one search window) is in memory at a time.

use coffer_common::host::fs::IoError;

use crate::records::Header;
use crate::store::{Location, PackNo, PackStore, PACK_HEADER_LEN, RECORD_HEADER_LEN};

/// Bytes read at a time while searching for the next record.
const WINDOW: usize = 1 << 20;

/// What the salvaging scan hands over, in pack order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Salvaged<'a> {
    /// An intact chunk record.
    Chunk {
        id: coffer_common::chunk::ChunkId,
        loc: Location,
    },
    /// An intact commit record (its body matches its hash; not yet decoded).
    Commit {
        header: crate::records::CommitHeader,
        offset: u64,
        body: &'a [u8],
    },
    /// An intact removal record (its body matches its hash; not yet decoded).
    Removal {
        header: crate::records::RemovalHeader,
        offset: u64,
        body: &'a [u8],
    },
    /// A record whose header is intact but whose body does not match its hash: skipped.
    Damaged {
        header: Header,
        offset: u64,
        body: &'a [u8],
    },
    /// `len` bytes at `offset` in which no record starts: skipped up to the next one.
    Unreadable { offset: u64, len: u64 },
}

/// What was found at an offset.
enum At {
    /// A whole record whose body matches its hash (the body is in the buffer).
    Intact(Header),
    /// A whole record whose body does not match (the body is in the buffer).
    BadBody(Header),
    /// No header, or one whose record does not fit in the pack.
    Nothing,
}

struct Reader<'s> {
    store: &'s dyn PackStore,
    pack: PackNo,
    len: u64,
}

impl Reader<'_> {
    fn at(&self, offset: u64, body: &mut Vec<u8>) -> Result<At, IoError> {
        if offset + RECORD_HEADER_LEN > self.len {
            return Ok(At::Nothing);
        }
        let mut head = [0u8; RECORD_HEADER_LEN as usize];
        self.store.read_at(self.pack, offset, &mut head)?;
        let Some(h) = Header::decode(&head) else {
            return Ok(At::Nothing);
        };
        if offset + h.record_len() > self.len {
            return Ok(At::Nothing);
        }
        body.resize(h.body_len() as usize, 0);
        self.store
            .read_at(self.pack, offset + RECORD_HEADER_LEN, body)?;
        Ok(if blake3::hash(body).as_bytes() == h.hash() {
            At::Intact(h)
        } else {
            At::BadBody(h)
        })
    }

    /// True when a header decodes at `offset` and its record fits in the pack (its body
    /// not checked).
    fn header_fits(&self, offset: u64) -> Result<bool, IoError> {
        if offset + RECORD_HEADER_LEN > self.len {
            return Ok(false);
        }
        let mut head = [0u8; RECORD_HEADER_LEN as usize];
        self.store.read_at(self.pack, offset, &mut head)?;
        Ok(Header::decode(&head).is_some_and(|h| offset + h.record_len() <= self.len))
    }

    fn intact(&self, offset: u64, scratch: &mut Vec<u8>) -> Result<bool, IoError> {
        Ok(matches!(self.at(offset, scratch)?, At::Intact(_)))
    }

    /// The first offset after `from` where an intact record starts, if any.
    fn next_intact(&self, from: u64, scratch: &mut Vec<u8>) -> Result<Option<u64>, IoError> {
        let mut window = vec![0u8; WINDOW];
        let mut start = from + 1;
        while start + RECORD_HEADER_LEN <= self.len {
            let n = ((self.len - start) as usize).min(WINDOW);
            let w = &mut window[..n];
            self.store.read_at(self.pack, start, w)?;
            for i in 0..n.saturating_sub(3) {
                let m = &w[i..i + 4];
                if (m == crate::store::RECORD_MAGIC
                    || m == crate::records::COMMIT_MAGIC
                    || m == crate::records::REMOVAL_MAGIC)
                    && self.intact(start + i as u64, scratch)?
                {
                    return Ok(Some(start + i as u64));
                }
            }
            if n < WINDOW {
                break;
            }
            // The next window overlaps by three bytes, so a magic across the seam is seen.
            start += (n - 3) as u64;
        }
        Ok(None)
    }
}

/// Reads every record of `pack` (whose file is `len` bytes) from just past its header,
/// handing each intact one, each damaged one and each unreadable stretch to `f` in order.
/// Returns the offset just past the last intact record (the pack header's end when there is
/// none): everything from there on is a torn tail.
pub fn salvage<E: From<IoError>>(
    store: &dyn PackStore,
    pack: PackNo,
    len: u64,
    mut f: impl FnMut(Salvaged<'_>) -> Result<(), E>,
) -> Result<u64, E> {
    let r = Reader { store, pack, len };
    let (mut body, mut scratch) = (Vec::new(), Vec::new());
    let mut at = PACK_HEADER_LEN;
    let mut end = PACK_HEADER_LEN;
    while at + RECORD_HEADER_LEN <= len {
        match r.at(at, &mut body)? {
            At::Intact(h) => {
                match h {
                    Header::Chunk(c) => f(Salvaged::Chunk {
                        id: c.id,
                        loc: Location {
                            pack,
                            offset: at,
                            len: c.len,
                            hash: c.hash,
                        },
                    })?,
                    Header::Commit(c) => f(Salvaged::Commit {
                        header: c,
                        offset: at,
                        body: &body,
                    })?,
                    Header::Removal(rh) => f(Salvaged::Removal {
                        header: rh,
                        offset: at,
                        body: &body,
                    })?,
                }
                at += h.record_len();
                end = at;
                continue;
            }
            // A header followed by another whole record's header is believed: only its
            // body is damaged.
            At::BadBody(h) if r.header_fits(at + h.record_len())? => {
                f(Salvaged::Damaged {
                    header: h,
                    offset: at,
                    body: &body,
                })?;
                at += h.record_len();
                continue;
            }
            // The last record of the pack, whole, that does not match: named (bit rot in
            // the newest record, or a write a crash cut off before it was acknowledged),
            // and cut with the tail, as recovery would.
            At::BadBody(h) if at + h.record_len() == len => {
                f(Salvaged::Damaged {
                    header: h,
                    offset: at,
                    body: &body,
                })?;
                break;
            }
            At::BadBody(_) | At::Nothing => {}
        }
        match r.next_intact(at, &mut scratch)? {
            Some(next) => {
                f(Salvaged::Unreadable {
                    offset: at,
                    len: next - at,
                })?;
                at = next;
            }
            None => break,
        }
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{CommitRecord, Deletion};
    use crate::store::{LocalPacks, RecordHeader};
    use coffer_common::chunk::{ChunkId, FileId};
    use coffer_common::wire::CommitId;

    fn chunk(id: u8, sealed: &[u8]) -> Vec<u8> {
        let mut v = RecordHeader {
            id: ChunkId([id; 32]),
            len: sealed.len() as u32,
            hash: *blake3::hash(sealed).as_bytes(),
        }
        .encode()
        .to_vec();
        v.extend_from_slice(sealed);
        v
    }

    fn commit(version: u64) -> Vec<u8> {
        let mut v = Vec::new();
        CommitRecord {
            commit_id: CommitId([version as u8; 16]),
            file_id: FileId([1; 32]),
            version,
            commit_time: 1_700_000_000,
            deletion: Deletion::No,
            manifest: vec![7; 50],
            chunks: vec![ChunkId([1; 32])],
        }
        .encode_into(&mut v);
        v
    }

    /// A pack made of `records`, then `tail`; returns the store, each record's offset and
    /// the pack's length.
    fn pack(d: &std::path::Path, records: &[Vec<u8>], tail: &[u8]) -> (LocalPacks, Vec<u64>, u64) {
        let repo = crate::Layout::new(d).repo(&"r".parse().expect("name"));
        repo.create().expect("create");
        let s = LocalPacks::new(repo.packs());
        s.create(PackNo(1)).expect("create");
        let mut at = PACK_HEADER_LEN;
        let mut offsets = Vec::new();
        for r in records {
            s.write_at(PackNo(1), at, r).expect("write");
            offsets.push(at);
            at += r.len() as u64;
        }
        s.write_at(PackNo(1), at, tail).expect("write");
        let len = s.len(PackNo(1)).expect("len");
        (s, offsets, len)
    }

    /// What the scan saw, in words, and where it says the torn tail starts.
    fn seen(s: &LocalPacks, len: u64) -> (Vec<String>, u64) {
        let mut out = Vec::new();
        let end = salvage::<IoError>(s, PackNo(1), len, |x| {
            out.push(match x {
                Salvaged::Chunk { id, loc } => format!("chunk {} at {}", id.0[0], loc.offset),
                Salvaged::Commit {
                    header,
                    body,
                    offset,
                } => {
                    let c = CommitRecord::decode(&header, body).expect("decodes");
                    format!("commit {} at {offset}", c.version)
                }
                Salvaged::Removal { body, offset, .. } => {
                    let r = crate::records::RemovalRecord::decode(body).expect("decodes");
                    format!("removal of {} at {offset}", r.removed.len())
                }
                Salvaged::Damaged { offset, .. } => format!("damaged at {offset}"),
                Salvaged::Unreadable { offset, len } => format!("unreadable {len} at {offset}"),
            });
            Ok(())
        })
        .expect("salvage");
        (out, end)
    }

    #[test]
    fn a_damaged_body_is_skipped_by_its_length() {
        let d = tempfile::tempdir().expect("tempdir");
        let recs = [chunk(1, &[1; 3000]), commit(4), chunk(2, &[2; 100])];
        let (s, o, len) = pack(d.path(), &recs, b"");
        // One flipped byte in the first chunk's sealed bytes, one in the commit's body.
        s.write_at(PackNo(1), o[0] + 72 + 10, b"X").expect("flip");
        s.write_at(PackNo(1), o[1] + 72 + 40, b"X").expect("flip");
        let (out, end) = seen(&s, len);
        assert_eq!(
            out,
            [
                format!("damaged at {}", o[0]),
                format!("damaged at {}", o[1]),
                format!("chunk 2 at {}", o[2])
            ]
        );
        assert_eq!(end, len);
    }

    #[test]
    fn a_bad_header_is_passed_by_finding_the_next_intact_record() {
        let d = tempfile::tempdir().expect("tempdir");
        let recs = [
            chunk(1, &[1; 500]),
            chunk(2, &[2; 2000]),
            commit(9),
            chunk(3, &[3; 10]),
        ];
        let (s, o, len) = pack(d.path(), &recs, b"");
        // The second record's magic, and the commit record's length, are hit.
        s.write_at(PackNo(1), o[1], b"CRAP").expect("flip");
        s.write_at(PackNo(1), o[2] + 36, &[0xff, 0xff, 0, 0])
            .expect("flip");
        let (out, end) = seen(&s, len);
        assert_eq!(
            out,
            [
                format!("chunk 1 at {}", o[0]),
                format!("unreadable {} at {}", o[3] - o[1], o[1]),
                format!("chunk 3 at {}", o[3]),
            ]
        );
        assert_eq!(end, len);
    }

    #[test]
    fn a_removal_record_is_read_and_found_past_damage() {
        use crate::records::{RemovalRecord, Removed};
        let (h, b) = RemovalRecord {
            time: 1,
            removed: vec![Removed {
                version: 3,
                file_id: FileId([1; 32]),
                commit_id: CommitId([3; 16]),
            }],
        }
        .encode();
        let mut rm = h.to_vec();
        rm.extend_from_slice(&b);
        let d = tempfile::tempdir().expect("tempdir");
        let recs = [chunk(1, &[1; 10]), vec![7u8; 300], rm.clone(), commit(4)];
        let (s, o, len) = pack(d.path(), &recs, b"");
        let (out, end) = seen(&s, len);
        assert_eq!(
            out,
            [
                format!("chunk 1 at {}", o[0]),
                format!("unreadable 300 at {}", o[1]),
                format!("removal of 1 at {}", o[2]),
                format!("commit 4 at {}", o[3]),
            ]
        );
        assert_eq!(end, len);
    }

    #[test]
    fn a_bad_header_before_a_record_in_a_later_window_is_found() {
        let d = tempfile::tempdir().expect("tempdir");
        // Junk longer than the search window, with a magic in it that does not validate,
        // then a record.
        let mut junk = vec![0u8; WINDOW + 5000];
        junk[100..104].copy_from_slice(b"CREC");
        junk[WINDOW - 2..WINDOW + 2].copy_from_slice(b"CCMT");
        let recs = [chunk(1, &[1; 10]), junk, commit(2)];
        let (s, o, len) = pack(d.path(), &recs, b"");
        let (out, end) = seen(&s, len);
        assert_eq!(
            out,
            [
                format!("chunk 1 at {}", o[0]),
                format!("unreadable {} at {}", o[2] - o[1], o[1]),
                format!("commit 2 at {}", o[2]),
            ]
        );
        assert_eq!(end, len);
    }

    #[test]
    fn a_torn_tail_is_where_the_scan_ends() {
        let d = tempfile::tempdir().expect("tempdir");
        let last = chunk(3, &[3; 1000]);
        let recs = [chunk(1, &[1; 10]), commit(5)];
        // A record cut short, then nothing.
        let (s, o, len) = pack(d.path(), &recs, &last[..500]);
        let (out, end) = seen(&s, len);
        assert_eq!(
            out,
            [
                format!("chunk 1 at {}", o[0]),
                format!("commit 5 at {}", o[1])
            ]
        );
        assert_eq!(end, len - 500);
        // A whole last record whose body does not match is named, then cut with the tail.
        let d = tempfile::tempdir().expect("tempdir");
        let mut bad = last.clone();
        bad[900] ^= 1;
        let (s, _, len) = pack(d.path(), &recs, &bad);
        let (out, end) = seen(&s, len);
        let at = len - bad.len() as u64;
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[2], format!("damaged at {at}"));
        assert_eq!(end, at);
        // Damage then a torn tail: the stretch is cut with the tail.
        let d = tempfile::tempdir().expect("tempdir");
        let (s, o, len) = pack(d.path(), &recs, &last[..100]);
        s.write_at(PackNo(1), o[1], b"XXXX").expect("flip");
        let (out, end) = seen(&s, len);
        assert_eq!(out, [format!("chunk 1 at {}", o[0])]);
        assert_eq!(end, o[1]);
        // An empty pack.
        let d = tempfile::tempdir().expect("tempdir");
        let (s, _, len) = pack(d.path(), &[], b"");
        assert_eq!(seen(&s, len), (vec![], PACK_HEADER_LEN));
    }
}
