//! FIFOs, sockets and device nodes: recorded by type, mode, owner and (a device's) number;
//! made again by a restore (`mknod`, `mkfifo`): devices only by root, a restore by anyone
//! else warns and skips them.

use std::fs::FileType;
use std::os::unix::fs::FileTypeExt;

use coffer_common::manifest::SpecialKind;

/// The kind of a file that is neither regular, a folder nor a link (`None` for those).
pub fn kind_of(ft: &FileType) -> Option<SpecialKind> {
    if ft.is_fifo() {
        Some(SpecialKind::Fifo)
    } else if ft.is_socket() {
        Some(SpecialKind::Socket)
    } else if ft.is_char_device() {
        Some(SpecialKind::CharDevice)
    } else if ft.is_block_device() {
        Some(SpecialKind::BlockDevice)
    } else {
        None
    }
}

/// The `mknod` file type bits of a kind.
pub fn sflag(kind: SpecialKind) -> nix::sys::stat::SFlag {
    use nix::sys::stat::SFlag;
    match kind {
        SpecialKind::Fifo => SFlag::S_IFIFO,
        SpecialKind::Socket => SFlag::S_IFSOCK,
        SpecialKind::CharDevice => SFlag::S_IFCHR,
        SpecialKind::BlockDevice => SFlag::S_IFBLK,
    }
}

/// What a version of a special file is, for the journal's summary: kind, number, mode,
/// owner and mtime.
pub fn summary(
    kind: SpecialKind,
    rdev: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
) -> Vec<u8> {
    let mut s = b"special\0".to_vec();
    s.push(kind as u8);
    s.extend(rdev.to_le_bytes());
    s.extend((mode & 0o7777).to_le_bytes());
    s.extend(uid.to_le_bytes());
    s.extend(gid.to_le_bytes());
    s.extend(mtime_ns.to_le_bytes());
    s
}
