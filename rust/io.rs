//! Thin, explicit wrappers over the system calls the core needs: reading a caller's descriptor,
//! writing to one, positional reads, fsync, and a rename that never replaces.
//!
//! EINTR policy: calls that can block for an unbounded time on a pipe or socket (`read_fd`,
//! `write_fd`) return EINTR to their caller, which keeps its state and may resume; the Python
//! wrappers use that moment to run signal handlers (so Ctrl-C works while `sendmail` waits on
//! standard input). Calls on regular files (`pread_exact`, fsync, open, rename) retry EINTR here.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// One `read(2)` from a descriptor the caller owns (we never close it). Returns 0 at EOF.
/// EINTR is returned to the caller. A non-blocking descriptor that has no data yet is waited
/// for with `poll(2)` (a parent may have left standard input non-blocking).
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = last_err();
        match err.raw_os_error() {
            Some(libc::EAGAIN) => wait_fd(fd, libc::POLLIN)?,
            #[allow(unreachable_patterns)] // EWOULDBLOCK == EAGAIN on Linux
            Some(libc::EWOULDBLOCK) => wait_fd(fd, libc::POLLIN)?,
            _ => return Err(err),
        }
    }
}

/// Block until `fd` is ready for `events` (or has an error/hangup, which the next read or
/// write then reports).
fn wait_fd(fd: RawFd, events: libc::c_short) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
    if rc < 0 {
        return Err(last_err());
    }
    Ok(())
}

/// One `write(2)` of as much of `data` as the descriptor takes. EINTR and EAGAIN are returned
/// to the caller: `send_to` and `append_to` require a blocking descriptor, and a socket with
/// `SO_SNDTIMEO` reports its timeout as EAGAIN. A zero-length write is reported as EIO.
pub fn write_fd(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    // SAFETY: `data` is valid for reads of `data.len()` bytes.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if n < 0 {
        return Err(last_err());
    }
    if n == 0 {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(n as usize)
}

/// Fill `buf` from `fd` at `offset` with `pread(2)`; never touches the file offset. Returns
/// the number of bytes read, which is short only at end of file.
pub fn pread_full(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0usize;
    while done < buf.len() {
        let off = offset
            .checked_add(done as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let rest = &mut buf[done..];
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes.
        let n = unsafe { libc::pread(fd, rest.as_mut_ptr().cast(), rest.len(), off) };
        if n < 0 {
            let err = last_err();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// `fsync(2)`, retrying EINTR.
pub fn fsync_fd(fd: RawFd) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an integer descriptor.
        if unsafe { libc::fsync(fd) } == 0 {
            return Ok(());
        }
        let err = last_err();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// `fdatasync(2)` where the system has it (the file's size, needed to read appended data, is
/// flushed too), else `fsync(2)`; retries EINTR.
pub fn fdatasync_fd(fd: RawFd) -> io::Result<()> {
    loop {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        // SAFETY: plain syscall on an integer descriptor.
        let rc = unsafe { libc::fdatasync(fd) };
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        // SAFETY: plain syscall on an integer descriptor.
        let rc = unsafe { libc::fsync(fd) };
        if rc == 0 {
            return Ok(());
        }
        let err = last_err();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Best effort: if `fd` is a pipe (or FIFO), grow its buffer to `size` bytes so that one
/// `read(2)` can return that much (Linux `F_SETPIPE_SZ`; a default pipe holds 64 KiB, so
/// reading a large message from it takes a read, and a wake-up of the writer, per 64 KiB).
/// Never fails: an unprivileged caller over `/proc/sys/fs/pipe-max-size` or its pipe-buffer
/// quota (EPERM), a pipe already larger, or another system keeps its pipe as it is.
pub fn grow_pipe(fd: RawFd, size: usize) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: fstat into a zeroed stat buffer; fcntl on an integer descriptor.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFIFO {
                return;
            }
            let Ok(size) = libc::c_int::try_from(size) else {
                return;
            };
            let cur = libc::fcntl(fd, libc::F_GETPIPE_SZ);
            if cur >= 0 && cur < size {
                libc::fcntl(fd, libc::F_SETPIPE_SZ, size);
            }
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (fd, size);
}

/// What `start_writeback` achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writeback {
    /// Writeback of the range was started (or the range had nothing dirty).
    Started,
    /// Not this time (interrupted by a signal); later calls may succeed.
    Skipped,
    /// The file (or system) cannot do it, or it failed: do not ask again. Never an error of
    /// the data itself: `fsync` alone decides whether the data is durable.
    Unsupported,
}

/// Ask the kernel to start writing `len` bytes at `offset` of `fd` to the disk now, without
/// waiting for them (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`; elsewhere nothing). A
/// hint only: the later `fsync` then has only the rest to wait for.
///
/// Only `SYNC_FILE_RANGE_WRITE` is used, never the WAIT flags: waiting consumes the file's
/// writeback-error mark, and an I/O error seen (and ignored) here would then not be reported
/// by the `fsync` that decides durability. Starting writeback leaves that mark alone, so an
/// error of these pages still reaches `fsync`.
pub fn start_writeback(fd: RawFd, offset: u64, len: u64) -> Writeback {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let (Ok(off), Ok(n)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return Writeback::Unsupported;
        };
        // SAFETY: plain syscall on an integer descriptor; no memory is passed.
        let rc = unsafe { libc::sync_file_range(fd, off, n, libc::SYNC_FILE_RANGE_WRITE) };
        if rc == 0 {
            return Writeback::Started;
        }
        match last_err().raw_os_error() {
            Some(libc::EINTR) => Writeback::Skipped,
            // EINVAL (file system without it, bad flags), ENOSYS (no such call), ESPIPE (not
            // a regular file) and anything else (EIO, ENOMEM, ...): stop hinting; fsync
            // reports what matters.
            _ => Writeback::Unsupported,
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = (fd, offset, len);
        Writeback::Unsupported
    }
}

/// The directory a path lives in ("." for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Make a directory's entries durable. Filesystems that cannot fsync a directory (EINVAL)
/// have nothing more to give, so that is not an error.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?;
    match fsync_fd(f.as_raw_fd()) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

/// `flock(fd, op)`, retrying EINTR (a blocking `LOCK_EX` waits only for a queue runner's
/// momentary probe).
pub fn flock(fd: RawFd, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an integer descriptor.
        if unsafe { libc::flock(fd, op) } == 0 {
            return Ok(());
        }
        let err = last_err();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Create a new file for writing: `O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC|O_WRONLY`, mode 0600.
pub fn create_excl(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Open an existing file for positional reading: `O_RDONLY|O_NOFOLLOW|O_CLOEXEC`, plus
/// `O_NONBLOCK` so that a FIFO planted in the spool cannot block the open (it has no effect on
/// a regular file, and callers refuse anything else).
pub fn open_read(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
}

/// Rename `src` to `dst` atomically unless `dst` exists (then EEXIST). Uses
/// `renameat2(RENAME_NOREPLACE)`; where the kernel or filesystem lacks it, `link(2)` (which
/// never replaces) followed by `unlink(2)` of the source.
pub fn rename_noreplace(src: &Path, dst: &Path) -> io::Result<()> {
    let s = cstr(src)?;
    let d = cstr(dst)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        loop {
            // SAFETY: both strings are valid NUL-terminated paths. The raw syscall avoids
            // depending on a glibc new enough to wrap renameat2 (manylinux).
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_renameat2,
                    libc::AT_FDCWD,
                    s.as_ptr(),
                    libc::AT_FDCWD,
                    d.as_ptr(),
                    libc::RENAME_NOREPLACE,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let err = last_err();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOSYS) | Some(libc::EINVAL) => break,
                _ => return Err(err),
            }
        }
    }
    link_unlink(&s, &d)
}

/// The fallback of `rename_noreplace`, public so tests can exercise it.
pub fn link_unlink(s: &CString, d: &CString) -> io::Result<()> {
    // SAFETY: valid NUL-terminated paths.
    if unsafe { libc::link(s.as_ptr(), d.as_ptr()) } != 0 {
        return Err(last_err());
    }
    // The message is now committed under `dst`. If removing the temporary name fails, what is
    // left is a second link to the same inode in tmp/, which queue runs delete as debris.
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::unlink(s.as_ptr()) };
    Ok(())
}

/// Best effort: the file a descriptor refers to, for error messages (`/proc/self/fd`). Only
/// absolute paths are returned: sockets and pipes have none.
pub fn fd_path(fd: RawFd) -> Option<PathBuf> {
    let p = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    if p.is_absolute() {
        Some(p)
    } else {
        None
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh empty directory under the system temp dir, removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "dma-core-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).expect("mkdir");
            TempDir(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::TempDir;
    use super::*;
    use std::io::Write;

    #[test]
    fn create_excl_refuses_existing_and_symlink() {
        let t = TempDir::new();
        let p = t.path().join("a");
        let f = create_excl(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            create_excl(&p).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        let l = t.path().join("link");
        std::os::unix::fs::symlink(t.path().join("nowhere"), &l).unwrap();
        assert!(create_excl(&l).is_err());
        assert!(!t.path().join("nowhere").exists());
    }

    #[test]
    fn open_read_refuses_symlink() {
        let t = TempDir::new();
        let p = t.path().join("a");
        std::fs::write(&p, b"x").unwrap();
        let l = t.path().join("l");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert_eq!(open_read(&l).unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert!(open_read(&p).is_ok());
    }

    #[test]
    fn rename_noreplace_refuses_existing() {
        let t = TempDir::new();
        let a = t.path().join("a");
        let b = t.path().join("b");
        let c = t.path().join("c");
        std::fs::write(&a, b"A").unwrap();
        std::fs::write(&b, b"B").unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(std::fs::read(&b).unwrap(), b"B");
        assert!(a.exists());
        rename_noreplace(&a, &c).unwrap();
        assert!(!a.exists());
        assert_eq!(std::fs::read(&c).unwrap(), b"A");
    }

    #[test]
    fn link_fallback_refuses_existing() {
        let t = TempDir::new();
        let a = t.path().join("a");
        let b = t.path().join("b");
        let c = t.path().join("c");
        std::fs::write(&a, b"A").unwrap();
        std::fs::write(&b, b"B").unwrap();
        let (sa, sb, sc) = (cstr(&a).unwrap(), cstr(&b).unwrap(), cstr(&c).unwrap());
        assert_eq!(
            link_unlink(&sa, &sb).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        link_unlink(&sa, &sc).unwrap();
        assert!(!a.exists());
        assert_eq!(std::fs::read(&c).unwrap(), b"A");
    }

    #[test]
    fn pread_does_not_move_offset() {
        let t = TempDir::new();
        let p = t.path().join("a");
        std::fs::write(&p, b"0123456789").unwrap();
        let f = open_read(&p).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(pread_full(f.as_raw_fd(), &mut buf, 3).unwrap(), 4);
        assert_eq!(&buf, b"3456");
        assert_eq!(pread_full(f.as_raw_fd(), &mut buf, 8).unwrap(), 2);
        // SAFETY: querying the offset of a valid fd.
        let off = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_CUR) };
        assert_eq!(off, 0);
    }

    #[test]
    fn grow_pipe_only_grows_pipes() {
        let mut fds = [0; 2];
        // SAFETY: valid array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        grow_pipe(fds[0], 1 << 20);
        if cfg!(any(target_os = "linux", target_os = "android")) {
            // SAFETY: fcntl on our pipe.
            let sz = unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) };
            // 1 MiB unless this user is over its pipe-buffer quota; never smaller than before
            assert!(sz >= 65536, "{sz}");
        }
        assert_eq!(write_fd(fds[1], b"abc").unwrap(), 3);
        let mut buf = [0u8; 8];
        assert_eq!(read_fd(fds[0], &mut buf).unwrap(), 3);
        // SAFETY: closing our pipe.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        // not a pipe, not open: nothing happens
        let t = TempDir::new();
        let f = create_excl(&t.path().join("f")).unwrap();
        grow_pipe(f.as_raw_fd(), 1 << 20);
        grow_pipe(1_000_000, 1 << 20);
    }

    #[test]
    fn start_writeback_is_a_hint() {
        let t = TempDir::new();
        let path = t.path().join("f");
        let mut f = create_excl(&path).unwrap();
        f.write_all(&[b'x'; 3 << 20]).unwrap();
        let fd = f.as_raw_fd();
        if cfg!(any(target_os = "linux", target_os = "android")) {
            assert_eq!(start_writeback(fd, 0, 1 << 20), Writeback::Started);
            assert_eq!(start_writeback(fd, 1 << 20, 2 << 20), Writeback::Started);
            // past the end: nothing to do, not an error
            assert_eq!(start_writeback(fd, 8 << 20, 1 << 20), Writeback::Started);
        }
        fsync_fd(fd).unwrap();
        // a pipe (ESPIPE), a closed descriptor, a negative offset: never more than a refusal
        let mut fds = [0; 2];
        // SAFETY: valid array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert_eq!(start_writeback(fds[1], 0, 4096), Writeback::Unsupported);
        // SAFETY: closing our pipe.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_eq!(start_writeback(1_000_000, 0, 4096), Writeback::Unsupported);
        assert_eq!(start_writeback(fd, u64::MAX, 1), Writeback::Unsupported);
        assert_eq!(std::fs::read(&path).unwrap().len(), 3 << 20);
    }

    #[test]
    fn pipe_read_write_and_fd_path() {
        let mut fds = [0; 2];
        // SAFETY: valid array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert_eq!(write_fd(fds[1], b"hello").unwrap(), 5);
        let mut buf = [0u8; 16];
        assert_eq!(read_fd(fds[0], &mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        assert!(fd_path(fds[0]).is_none());
        // SAFETY: closing our own pipe ends.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        let t = TempDir::new();
        let p = t.path().join("f");
        let mut f = File::create(&p).unwrap();
        f.write_all(b"x").unwrap();
        assert_eq!(fd_path(f.as_raw_fd()).unwrap(), p);
    }

    #[test]
    fn flock_conflicts_between_descriptions() {
        let t = TempDir::new();
        let p = t.path().join("a");
        let a = create_excl(&p).unwrap();
        flock(a.as_raw_fd(), libc::LOCK_EX).unwrap();
        let b = open_read(&p).unwrap();
        let e = flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK));
        drop(a);
        flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB).unwrap();
    }

    #[test]
    fn fsync_dir_works() {
        let t = TempDir::new();
        fsync_dir(t.path()).unwrap();
        assert_eq!(parent_dir(Path::new("x")), PathBuf::from("."));
        assert_eq!(parent_dir(Path::new("/a/b")), PathBuf::from("/a"));
    }
}
