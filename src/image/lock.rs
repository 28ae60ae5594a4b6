//! QEMU-compatible image locking (FORMAT.md section 8), so that libqbm and
//! QEMU processes refuse each other exactly as two QEMUs do.
//!
//! QEMU holds an OFD read lock on byte 100+p for each permission p it uses
//! and on byte 200+p for each permission it will not share. We take our
//! locks first and test for conflicts second (as QEMU does): two openers
//! racing then both fail instead of both succeeding.

use crate::error::{Error, Result};
use nix::fcntl::{fcntl, FcntlArg};
use std::fs::File;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// The permissions of QEMU's block layer that have lock bytes.
#[derive(Clone, Copy)]
enum Perm {
    ConsistentRead = 0,
    Write = 1,
    Resize = 3,
}

impl Perm {
    fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::Resize => "resize",
        }
    }
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

fn os_error(name: &str, e: nix::errno::Errno) -> Error {
    Error::io(
        format!("{name}: cannot lock"),
        std::io::Error::from_raw_os_error(e as i32),
    )
}

/// True if another open file description holds a lock on `byte`.
fn held_by_other(file: &File, byte: i64, name: &str) -> Result<bool> {
    let mut probe = flock(libc::F_WRLCK, byte);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|e| os_error(name, e))?;
    Ok(probe.l_type != libc::F_UNLCK as libc::c_short)
}

/// Holds an image's locks; dropping it releases them. Closing the image file
/// is not enough: a child process forked (and not yet exec'd) elsewhere in
/// the program shares the open file description and would keep them.
pub struct LockGuard {
    /// A duplicate descriptor of the locked open file description.
    file: File,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let all = libc::flock {
            l_len: SHARED_BASE + 100 - PERM_BASE,
            ..flock(libc::F_UNLCK, PERM_BASE)
        };
        // Nothing useful can be done if unlocking fails; closing still does it.
        let _ = fcntl(&self.file, FcntlArg::F_OFD_SETLK(&all));
    }
}

/// Takes the locks of a writer (uses read, write and resize; shares only
/// reading) or of a reader (consistent read; does not share writing).
pub fn lock(file: &File, writable: bool, name: &str) -> Result<LockGuard> {
    let guard = LockGuard {
        file: file
            .try_clone()
            .map_err(|e| Error::io(format!("{name}: cannot lock"), e))?,
    };
    let (used, unshared): (&[Perm], &[Perm]) = if writable {
        (
            &[Perm::ConsistentRead, Perm::Write, Perm::Resize],
            &[Perm::Write, Perm::Resize],
        )
    } else {
        (&[Perm::ConsistentRead], &[Perm::Write])
    };
    let ours = used.iter().map(|&p| (PERM_BASE + p as i64, "", p)).chain(
        unshared
            .iter()
            .map(|&p| (SHARED_BASE + p as i64, "shared ", p)),
    );
    for (byte, shared, p) in ours {
        let fl = flock(libc::F_RDLCK, byte);
        match fcntl(file, FcntlArg::F_OFD_SETLK(&fl)) {
            Ok(_) => {}
            // Someone holds a write lock there: a conflict like those below.
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) => {
                return Err(busy(name, shared, p.name(), byte))
            }
            Err(e) => return Err(os_error(name, e)),
        }
    }
    for &p in used {
        if held_by_other(file, SHARED_BASE + p as i64, name)? {
            return Err(busy(name, "", p.name(), SHARED_BASE + p as i64));
        }
    }
    for &p in unshared {
        if held_by_other(file, PERM_BASE + p as i64, name)? {
            return Err(busy(name, "shared ", p.name(), PERM_BASE + p as i64));
        }
    }
    Ok(guard)
}

fn busy(name: &str, shared: &str, perm: &str, byte: i64) -> Error {
    Error::Busy(format!(
        "{name}: another process has the image open (failed to get {shared}\"{perm}\" lock on byte {byte}); \
         is a VM or qemu-img using it? (open with force-share to read anyway)"
    ))
}
