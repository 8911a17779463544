//! Process memory policy: the allocator's arenas.
//!
//! This holds the workspace's only `unsafe` block (the lint is `deny`, allowed here alone):
//! one call of glibc's `mallopt`, which no safe wrapper crate offers.

/// Makes the C allocator keep one arena for all threads (glibc; elsewhere it does nothing).
///
/// glibc gives a thread that allocates while another holds the arena an arena of its own
/// (up to 8 per core), and memory freed in one arena is not reused by threads of another.
/// The receiver's index pages and batches are allocated on whichever blocking thread runs a
/// flush, so they spread over several arenas and peak RSS depends on which threads ran what
/// rather than on what is live. Call it first thing in `main`, before any thread starts.
#[allow(unsafe_code)]
pub fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets an allocator parameter and is called before any other
    // thread exists. Its result (0 if the parameter were refused) changes nothing relied on.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
