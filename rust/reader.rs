//! `MessageFile`: one open queue file, read only with `pread` at offsets the reader owns.
//!
//! The descriptor's file offset is never used (no `read(2)`, no `lseek`), so any number of
//! cursors, in threads or in forked children sharing the descriptor, never disturb each other.
//!
//! `close()` is safe while other threads read: the descriptor is closed as soon as no `pread`
//! is in flight, and every later read reports that the file is closed. The bookkeeping is one
//! atomic word, no lock, so a child forked while a thread was reading cannot deadlock on it.

use crate::error::{CoreError, Result};
use crate::footer::{Footer, FOOTER_LEN};
use crate::io;
use crate::transform::{Kind, Stats, Transform, SMTP_LINE_LIMIT};
use std::os::unix::io::{IntoRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Default read size of cursors and streams.
pub const DEFAULT_CHUNK: usize = 1 << 20;
/// Largest chunk a caller may ask for.
pub const MAX_CHUNK: usize = 64 << 20;

const CLOSED: usize = 1 << (usize::BITS - 1);
const DONE: usize = 1 << (usize::BITS - 2);

/// The descriptor and its user count. The low bits of `state` count users: the owning
/// `MessageFile` (one, until `close`) plus reads in flight. `CLOSED` is set by `close`; the
/// user who brings the count to zero after that closes the descriptor and sets `DONE`.
#[derive(Debug)]
struct Shared {
    fd: RawFd,
    state: AtomicUsize,
}

struct Use<'a>(&'a Shared);

impl Drop for Use<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl Shared {
    fn new(fd: RawFd) -> Shared {
        Shared {
            fd,
            state: AtomicUsize::new(1),
        }
    }

    fn enter(&self) -> Option<Use<'_>> {
        let prev = self.state.fetch_add(1, Ordering::Acquire);
        if prev & CLOSED != 0 {
            self.leave();
            return None;
        }
        Some(Use(self))
    }

    fn leave(&self) {
        let prev = self.state.fetch_sub(1, Ordering::AcqRel);
        if prev == CLOSED | 1
            && self
                .state
                .compare_exchange(CLOSED, CLOSED | DONE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // SAFETY: we own the descriptor; DONE guarantees this runs once, and no read is in
            // flight (the count is zero with CLOSED set, so no new read can start).
            unsafe { libc::close(self.fd) };
        }
    }

    fn close(&self) {
        let prev = self.state.fetch_or(CLOSED, Ordering::AcqRel);
        if prev & CLOSED == 0 {
            self.leave(); // the owner's reference
        }
    }

    fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.state.load(Ordering::Acquire) & DONE == 0 {
            // SAFETY: last reference; the descriptor was not closed yet.
            unsafe { libc::close(self.fd) };
        }
    }
}

fn closed_error() -> CoreError {
    CoreError::usage("I/O operation on closed MessageFile")
}

/// Read exactly `buf.len()` bytes at `offset`; a short read means the file shrank under us.
fn pread_exact(shared: &Shared, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    let _use = shared.enter().ok_or_else(closed_error)?;
    let n = io::pread_full(shared.fd, buf, offset).map_err(|e| CoreError::io(e, path))?;
    if n < buf.len() {
        return Err(CoreError::corrupt(
            path,
            format!(
                "file shrank while being read (wanted {} bytes at offset {offset}, got {n})",
                buf.len()
            ),
        ));
    }
    Ok(())
}

fn check_chunk(chunk: usize) -> Result<()> {
    if chunk == 0 || chunk > MAX_CHUNK {
        return Err(CoreError::usage(format!(
            "chunk must be between 1 and {MAX_CHUNK}, not {chunk}"
        )));
    }
    Ok(())
}

/// One open, validated queue file.
#[derive(Debug)]
pub struct MessageFile {
    path: Arc<PathBuf>,
    shared: Arc<Shared>,
    footer: Footer,
    envelope: Vec<u8>,
}

impl MessageFile {
    /// Open `path` (O_RDONLY|O_NOFOLLOW|O_CLOEXEC), check its footer, length and envelope CRC.
    pub fn open(path: &Path) -> Result<MessageFile> {
        let file = io::open_read(path).map_err(|e| CoreError::io(e, path))?;
        let meta = file.metadata().map_err(|e| CoreError::io(e, path))?;
        if !meta.file_type().is_file() {
            return Err(CoreError::corrupt(path, "not a regular file"));
        }
        let shared = Arc::new(Shared::new(file.into_raw_fd()));
        let len = meta.len();
        if len < FOOTER_LEN as u64 {
            return Err(CoreError::corrupt(
                path,
                format!("file is {len} bytes, too short for the {FOOTER_LEN}-byte footer"),
            ));
        }
        let mut raw = [0u8; FOOTER_LEN];
        pread_exact(&shared, path, &mut raw, len - FOOTER_LEN as u64)?;
        let footer = Footer::decode(&raw).map_err(|r| CoreError::corrupt(path, r))?;
        let expected = footer
            .msg_len
            .checked_add(u64::from(footer.env_len))
            .and_then(|n| n.checked_add(FOOTER_LEN as u64));
        if expected != Some(len) {
            return Err(CoreError::corrupt(
                path,
                format!(
                    "length mismatch: footer says {} + {} + {FOOTER_LEN} bytes, file has {len} \
                     (truncated or appended to)",
                    footer.msg_len, footer.env_len
                ),
            ));
        }
        let mut envelope = vec![0u8; footer.env_len as usize];
        pread_exact(&shared, path, &mut envelope, footer.msg_len)?;
        let crc = crc32fast::hash(&envelope);
        if crc != footer.env_crc {
            return Err(CoreError::corrupt(
                path,
                format!(
                    "envelope CRC mismatch (footer {:08x}, computed {crc:08x})",
                    footer.env_crc
                ),
            ));
        }
        Ok(MessageFile {
            path: Arc::new(path.to_path_buf()),
            shared,
            footer,
            envelope,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Length of the message part.
    pub fn size(&self) -> u64 {
        self.footer.msg_len
    }
    pub fn eight_bit(&self) -> bool {
        self.footer.eight_bit
    }
    pub fn max_line(&self) -> u64 {
        self.footer.max_line
    }
    pub fn crc32(&self) -> u32 {
        self.footer.msg_crc
    }
    pub fn envelope(&self) -> &[u8] {
        &self.envelope
    }

    pub fn fileno(&self) -> Result<RawFd> {
        if self.shared.is_closed() {
            return Err(closed_error());
        }
        Ok(self.shared.fd)
    }

    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// Close the descriptor (once no read is in flight). Idempotent.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Recompute CRC, 8-bit flag and longest line of the message and compare with the footer.
    pub fn verify(&self) -> Result<()> {
        let mut stats = Stats::new();
        let mut buf = vec![0u8; DEFAULT_CHUNK.min(self.size() as usize).max(1)];
        let mut pos = 0u64;
        while pos < self.size() {
            let n = (self.size() - pos).min(buf.len() as u64) as usize;
            pread_exact(&self.shared, &self.path, &mut buf[..n], pos)?;
            stats.update(&buf[..n]);
            pos += n as u64;
        }
        match footer_mismatch(&stats, &self.footer) {
            None => Ok(()),
            Some(problem) => Err(CoreError::corrupt(&self.path, problem)),
        }
    }

    /// The raw head: message bytes up to and including the first empty line, or up to
    /// `limit` bytes (cut after the last line end within them if there is one), or the
    /// whole message if shorter.
    pub fn read_head(&self, limit: usize) -> Result<Vec<u8>> {
        const STEP: usize = 64 << 10;
        let max = (limit as u64).min(self.size()) as usize;
        let mut buf: Vec<u8> = Vec::new();
        while buf.len() < max {
            let old = buf.len();
            let n = STEP.min(max - old);
            buf.resize(old + n, 0);
            pread_exact(&self.shared, &self.path, &mut buf[old..], old as u64)?;
            if buf[0] == b'\n' {
                buf.truncate(1);
                return Ok(buf);
            }
            let from = old.saturating_sub(1);
            if let Some(i) = memchr::memmem::find(&buf[from..], b"\n\n") {
                buf.truncate(from + i + 2);
                return Ok(buf);
            }
        }
        if (max as u64) < self.size() {
            if let Some(i) = memchr::memrchr(b'\n', &buf) {
                buf.truncate(i + 1);
            }
        }
        Ok(buf)
    }

    /// A cursor over the message transformed by `kind`, from source `offset`, reading
    /// `chunk` source bytes at a time.
    pub fn cursor(&self, kind: Kind, offset: u64, chunk: usize) -> Result<Cursor> {
        check_chunk(chunk)?;
        if offset > self.size() {
            return Err(CoreError::usage(format!(
                "offset {offset} is beyond the end of the {}-byte message",
                self.size()
            )));
        }
        if self.shared.is_closed() {
            return Err(closed_error());
        }
        // smtp-wrap output is exactly smtp output when no line is longer than the limit (the
        // footer knows the longest line), and smtp has the faster loop.
        let kind = if kind == Kind::SmtpWrap && self.max_line() <= SMTP_LINE_LIMIT as u64 {
            Kind::Smtp
        } else {
            kind
        };
        let prev = if offset > 0 {
            let mut b = [0u8; 1];
            pread_exact(&self.shared, &self.path, &mut b, offset - 1)?;
            Some(b[0])
        } else {
            None
        };
        let transform = match prev {
            // Resumed inside a line: smtp-wrap needs the position in that line.
            Some(b) if b != b'\n' && kind == Kind::SmtpWrap => {
                Transform::resume_in_line(kind, prev, offset - self.line_start(offset)?)
            }
            _ => Transform::resume(kind, prev),
        };
        Ok(Cursor {
            shared: Arc::clone(&self.shared),
            path: Arc::clone(&self.path),
            end: self.size(),
            pos: offset,
            transform,
            chunk,
            inbuf: Vec::new(),
            done: false,
            check: (offset == 0).then(|| (Stats::new(), self.footer)),
            damaged: None,
        })
    }

    /// The offset of the start of the line holding the byte at `offset - 1`: just after the
    /// last LF before `offset`, or 0. Reads backwards in 64 KiB steps.
    fn line_start(&self, offset: u64) -> Result<u64> {
        const STEP: u64 = 64 << 10;
        let mut buf = vec![0u8; STEP as usize];
        let mut end = offset;
        while end > 0 {
            let start = end.saturating_sub(STEP);
            let b = &mut buf[..(end - start) as usize];
            pread_exact(&self.shared, &self.path, b, start)?;
            if let Some(i) = memchr::memrchr(b'\n', b) {
                return Ok(start + i as u64 + 1);
            }
            end = start;
        }
        Ok(0)
    }

    /// The whole message part (for tests and small messages only).
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.size() as usize];
        pread_exact(&self.shared, &self.path, &mut buf, 0)?;
        Ok(buf)
    }

    /// Write the whole transformed message to `fd`; retries EINTR. Returns bytes written.
    pub fn send_to(&self, fd: RawFd, kind: Kind, chunk: usize) -> Result<u64> {
        let mut pump = Pump::new(self.cursor(kind, 0, chunk)?, fd)?;
        loop {
            match pump.run() {
                Err(e) if e.is_interrupted() => continue,
                r => return r,
            }
        }
    }

    /// `send_to`, then fdatasync `fd` if `sync`.
    pub fn append_to(&self, fd: RawFd, kind: Kind, sync: bool) -> Result<u64> {
        let n = self.send_to(fd, kind, DEFAULT_CHUNK)?;
        if sync {
            sync_fd(fd)?;
        }
        Ok(n)
    }
}

/// What differs between the message bytes (their `stats`) and the footer, if anything.
fn footer_mismatch(stats: &Stats, f: &Footer) -> Option<String> {
    let saturated = stats.max_line().min(u64::from(u32::MAX));
    if stats.crc32() != f.msg_crc {
        Some(format!(
            "message CRC mismatch (footer {:08x}, computed {:08x})",
            f.msg_crc,
            stats.crc32()
        ))
    } else if stats.eight_bit() != f.eight_bit {
        Some("message 8-bit flag does not match its content".to_string())
    } else if saturated != f.max_line {
        Some(format!(
            "longest line mismatch (footer {}, computed {saturated})",
            f.max_line
        ))
    } else {
        None
    }
}

/// fdatasync a caller's descriptor, naming its file in the error if it has one.
pub fn sync_fd(fd: RawFd) -> Result<()> {
    io::fdatasync_fd(fd).map_err(|e| CoreError::Io {
        source: e,
        path: io::fd_path(fd),
    })
}

/// A reader with its own offset that yields transformed chunks.
#[derive(Debug)]
pub struct Cursor {
    shared: Arc<Shared>,
    path: Arc<PathBuf>,
    end: u64,
    pos: u64,
    transform: Transform,
    chunk: usize,
    inbuf: Vec<u8>,
    done: bool,
    /// For a cursor over the whole message: the bytes read so far, checked against the
    /// footer when the last of them is read, before the chunk holding them is returned (so
    /// a damaged file never reaches its end: no SMTP end of data, no complete mbox copy).
    check: Option<(Stats, Footer)>,
    /// Set once the check failed: every later call fails the same way.
    damaged: Option<String>,
}

impl Cursor {
    /// The source offset whose transformed bytes have all been returned (bytes the transform
    /// holds back at a chunk end are not counted, so a new cursor at this offset continues
    /// exactly).
    pub fn offset(&self) -> u64 {
        self.pos - self.transform.held()
    }

    /// The transform in use (`smtp` for an `smtp-wrap` cursor over a message without long
    /// lines: the output is the same).
    pub fn kind(&self) -> Kind {
        self.transform.kind()
    }

    /// Append the next transformed chunk to `out`. Returns false when the message is
    /// exhausted and nothing was appended.
    pub fn next_into(&mut self, out: &mut Vec<u8>) -> Result<bool> {
        if let Some(problem) = &self.damaged {
            return Err(CoreError::corrupt(&self.path, problem.clone()));
        }
        let start = out.len();
        if self.transform.kind() == Kind::Raw && self.pos < self.end {
            // Nothing to transform: read straight into the output.
            let n = (self.end - self.pos).min(self.chunk as u64) as usize;
            out.resize(start + n, 0);
            let r = pread_exact(&self.shared, &self.path, &mut out[start..], self.pos)
                .and_then(|()| self.checked(n as u64, &out[start..]));
            if r.is_err() {
                out.truncate(start);
            }
            r?;
            return Ok(true);
        }
        while self.pos < self.end {
            let n = (self.end - self.pos).min(self.chunk as u64) as usize;
            if self.inbuf.len() < n {
                self.inbuf.resize(n, 0);
            }
            pread_exact(&self.shared, &self.path, &mut self.inbuf[..n], self.pos)?;
            let inbuf = std::mem::take(&mut self.inbuf);
            let r = self.checked(n as u64, &inbuf[..n]);
            self.inbuf = inbuf;
            r?;
            self.transform.feed(&self.inbuf[..n], out);
            if out.len() > start {
                return Ok(true);
            }
        }
        if !self.done {
            self.done = true;
            self.inbuf = Vec::new();
            self.transform.finish(out);
        }
        Ok(out.len() > start)
    }
}

impl Cursor {
    /// Account for `data`, the `n` source bytes just read at `pos`, and advance; at the end
    /// of the message compare everything read with the footer.
    fn checked(&mut self, n: u64, data: &[u8]) -> Result<()> {
        self.pos += n;
        if let Some((stats, footer)) = &mut self.check {
            stats.update(data);
            if self.pos == self.end {
                if let Some(problem) = footer_mismatch(stats, footer) {
                    self.damaged = Some(problem.clone());
                    return Err(CoreError::corrupt(&self.path, problem));
                }
            }
        }
        Ok(())
    }
}

/// Streams a cursor to a descriptor. `run` can be called again after an EINTR error and
/// resumes without losing or repeating bytes.
#[derive(Debug)]
pub struct Pump {
    cursor: Cursor,
    fd: RawFd,
    buf: Vec<u8>,
    sent: usize,
    total: u64,
}

impl Pump {
    pub fn new(cursor: Cursor, fd: RawFd) -> Result<Pump> {
        if fd < 0 {
            return Err(CoreError::usage(format!("invalid descriptor {fd}")));
        }
        Ok(Pump {
            cursor,
            fd,
            buf: Vec::new(),
            sent: 0,
            total: 0,
        })
    }

    /// Bytes written so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn run(&mut self) -> Result<u64> {
        loop {
            while self.sent < self.buf.len() {
                match io::write_fd(self.fd, &self.buf[self.sent..]) {
                    Ok(n) => {
                        self.sent += n;
                        self.total += n as u64;
                    }
                    Err(e) => {
                        return Err(CoreError::Io {
                            source: e,
                            path: io::fd_path(self.fd),
                        })
                    }
                }
            }
            self.buf.clear();
            self.sent = 0;
            if !self.cursor.next_into(&mut self.buf)? {
                self.buf = Vec::new();
                return Ok(self.total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::testutil::TempDir;
    use crate::transform::transform_all;
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::io::AsRawFd;

    /// Write a queue file the way SpoolWriter does (message | envelope | footer).
    fn make(dir: &Path, name: &str, msg: &[u8], env: &[u8]) -> PathBuf {
        let mut s = Stats::new();
        s.update(msg);
        let f = Footer {
            msg_len: msg.len() as u64,
            env_len: env.len() as u32,
            msg_crc: s.crc32(),
            env_crc: crc32fast::hash(env),
            eight_bit: s.eight_bit(),
            max_line: s.max_line(),
        };
        let p = dir.join(name);
        let mut file = File::create(&p).unwrap();
        file.write_all(msg).unwrap();
        file.write_all(env).unwrap();
        file.write_all(&f.encode()).unwrap();
        p
    }

    fn sample_message() -> Vec<u8> {
        let mut m = Vec::new();
        for i in 0..20_000u32 {
            match i % 7 {
                0 => m.extend_from_slice(b"From someone\n"),
                1 => m.extend_from_slice(b".leading dot\n"),
                2 => m.extend_from_slice(b">>From quoted\n"),
                3 => m.extend_from_slice(b"\n"),
                4 => m.extend_from_slice(b"bare\rcr \xc3\xa9\0\n"),
                _ => m.extend_from_slice(format!("ordinary line {i}\n").as_bytes()),
            }
        }
        m.extend(vec![b'L'; 3000]);
        m.extend_from_slice(b"\n.");
        m.extend(vec![b'M'; 2000]);
        m.extend_from_slice(b"\nno final newline.");
        m
    }

    fn corrupt_msg(e: CoreError) -> String {
        match e {
            CoreError::Corrupt { reason, .. } => reason,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn open_and_properties() {
        let t = TempDir::new();
        let p = make(t.path(), "m", b"Subject: x\n\nhi\xff\n", b"{\"v\":1}");
        let m = MessageFile::open(&p).unwrap();
        assert_eq!(m.size(), 16);
        assert!(m.eight_bit());
        assert_eq!(m.max_line(), 10);
        assert_eq!(m.crc32(), crc32fast::hash(b"Subject: x\n\nhi\xff\n"));
        assert_eq!(m.envelope(), b"{\"v\":1}");
        assert_eq!(m.path(), p.as_path());
        m.verify().unwrap();
        assert_eq!(m.read_head(1 << 20).unwrap(), b"Subject: x\n\n");
        assert!(m.fileno().unwrap() >= 0);
        m.close();
        m.close();
        assert!(matches!(m.fileno(), Err(CoreError::Usage(_))));
        assert!(matches!(m.read_all(), Err(CoreError::Usage(_))));
        assert!(matches!(m.verify(), Err(CoreError::Usage(_))));
    }

    #[test]
    fn read_head_variants() {
        let t = TempDir::new();
        let p = make(t.path(), "a", b"A: 1\nB: 2\n\nbody\n\nmore", b"");
        let m = MessageFile::open(&p).unwrap();
        assert_eq!(m.read_head(1 << 20).unwrap(), b"A: 1\nB: 2\n\n");
        assert_eq!(m.read_head(7).unwrap(), b"A: 1\n");
        assert_eq!(m.read_head(3).unwrap(), b"A: ");
        assert_eq!(m.read_head(0).unwrap(), b"");
        let p = make(t.path(), "b", b"\nbody", b"");
        assert_eq!(
            MessageFile::open(&p).unwrap().read_head(100).unwrap(),
            b"\n"
        );
        let p = make(t.path(), "c", b"A: 1\nB: 2", b"");
        assert_eq!(
            MessageFile::open(&p).unwrap().read_head(100).unwrap(),
            b"A: 1\nB: 2"
        );
        // a head longer than one internal read step, blank line across the step boundary
        let mut big = vec![b'x'; (64 << 10) - 1];
        big.extend_from_slice(b"\n\nbody");
        let p = make(t.path(), "d", &big, b"");
        assert_eq!(
            MessageFile::open(&p)
                .unwrap()
                .read_head(1 << 20)
                .unwrap()
                .len(),
            (64 << 10) + 1
        );
    }

    #[test]
    fn corrupt_files_are_refused() {
        let t = TempDir::new();
        let good = make(t.path(), "good", b"hello\n", b"ENV");
        let bytes = std::fs::read(&good).unwrap();

        let short = t.path().join("short");
        std::fs::write(&short, b"tiny").unwrap();
        assert!(corrupt_msg(MessageFile::open(&short).unwrap_err()).contains("too short"));

        let trunc = t.path().join("trunc");
        std::fs::write(&trunc, &bytes[..bytes.len() - 1]).unwrap();
        assert!(corrupt_msg(MessageFile::open(&trunc).unwrap_err()).contains("magic"));

        let cut = t.path().join("cut");
        let mut b = bytes.clone();
        b.remove(0); // lose a message byte: footer intact, length wrong
        std::fs::write(&cut, &b).unwrap();
        assert!(corrupt_msg(MessageFile::open(&cut).unwrap_err()).contains("length mismatch"));

        let env = t.path().join("env");
        let mut b = bytes.clone();
        b[7] = b'X'; // inside the envelope
        std::fs::write(&env, &b).unwrap();
        assert!(corrupt_msg(MessageFile::open(&env).unwrap_err()).contains("envelope CRC"));

        let msg = t.path().join("msg");
        let mut b = bytes.clone();
        b[0] = b'J'; // inside the message: open succeeds, verify fails
        std::fs::write(&msg, &b).unwrap();
        let m = MessageFile::open(&msg).unwrap();
        assert!(corrupt_msg(m.verify().unwrap_err()).contains("message CRC"));

        let e = MessageFile::open(&t.path().join("missing")).unwrap_err();
        assert_eq!(e.raw_errno(), Some(libc::ENOENT));
        let e = MessageFile::open(t.path()).unwrap_err();
        assert!(corrupt_msg(e).contains("not a regular file"));
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert_eq!(
            MessageFile::open(&link).unwrap_err().raw_errno(),
            Some(libc::ELOOP)
        );
        // a FIFO must not block the open
        let fifo = t.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(corrupt_msg(MessageFile::open(&fifo).unwrap_err()).contains("regular"));
    }

    fn collect(c: &mut Cursor) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = Vec::new();
        while c.next_into(&mut buf).unwrap() {
            assert!(!buf.is_empty());
            all.extend_from_slice(&buf);
            buf.clear();
        }
        all
    }

    #[test]
    fn cursors_match_transforms_for_all_chunks() {
        let t = TempDir::new();
        let msg = sample_message();
        let p = make(t.path(), "m", &msg, b"{}");
        let m = MessageFile::open(&p).unwrap();
        for kind in Kind::ALL {
            let want = transform_all(kind, &msg);
            for chunk in [1, 2, 3, 7, 64, 1 << 20] {
                if chunk < 7 && kind != Kind::Mbox {
                    // byte-sized chunks over 300 KB are slow; mbox has the held-prefix logic
                    continue;
                }
                let mut c = m.cursor(kind, 0, chunk).unwrap();
                assert_eq!(collect(&mut c), want, "{kind:?} chunk {chunk}");
                assert_eq!(c.offset(), m.size());
            }
        }
        // small message, byte chunks, every kind
        let small = b"From a\n.\n>From b\nx\r\n..\nFrom";
        let p = make(t.path(), "s", small, b"");
        let m = MessageFile::open(&p).unwrap();
        for kind in Kind::ALL {
            for chunk in [1, 2, 3, 7, 64, 1 << 20] {
                let mut c = m.cursor(kind, 0, chunk).unwrap();
                assert_eq!(collect(&mut c), transform_all(kind, small));
            }
        }
    }

    #[test]
    fn cursor_resume_at_offset() {
        let t = TempDir::new();
        let msg = b"From a\n>From b\n.c\nmid From x\n";
        let p = make(t.path(), "m", msg, b"");
        let m = MessageFile::open(&p).unwrap();
        for kind in [Kind::Mbox, Kind::Smtp, Kind::SmtpWrap] {
            let whole = transform_all(kind, msg);
            // stop a byte-chunk cursor after some chunks, resume a new one at its offset
            for stop in 1..msg.len() {
                let mut c = m.cursor(kind, 0, 1).unwrap();
                let mut got = Vec::new();
                while c.offset() < stop as u64 && c.next_into(&mut got).unwrap() {}
                let off = c.offset();
                let mut d = m.cursor(kind, off, 3).unwrap();
                got.extend(collect(&mut d));
                assert_eq!(got, whole, "{kind:?} resumed at {off}");
            }
        }
        assert!(matches!(
            m.cursor(Kind::Raw, msg.len() as u64 + 1, 10),
            Err(CoreError::Usage(_))
        ));
        assert!(matches!(
            m.cursor(Kind::Raw, 0, 0),
            Err(CoreError::Usage(_))
        ));
        let mut c = m.cursor(Kind::Smtp, msg.len() as u64, 10).unwrap();
        assert_eq!(collect(&mut c), b".\r\n");
    }

    #[test]
    fn smtp_wrap_cursor_resume_mid_line() {
        let t = TempDir::new();
        let mut msg = vec![b'x'; 2500];
        msg.extend_from_slice(b"\n.short\n");
        msg.extend(vec![b'.'; 70_000]); // longer than one backward read step
        msg.extend_from_slice(b"\nend");
        let p = make(t.path(), "m", &msg, b"");
        let m = MessageFile::open(&p).unwrap();
        let whole = transform_all(Kind::SmtpWrap, &msg);
        assert_eq!(
            collect(&mut m.cursor(Kind::SmtpWrap, 0, 1 << 20).unwrap()),
            whole
        );
        let mut offs: Vec<usize> = vec![1, 997, 998, 999, 1995, 1996, 2500, 2501, 2502, 2509];
        offs.extend([2510, 3507, 3508, 50_000, 72_509, 72_510, 72_511, msg.len()]);
        for off in offs {
            for chunk in [7, 4096] {
                let mut c = m.cursor(Kind::SmtpWrap, 0, chunk).unwrap();
                let mut got = Vec::new();
                while c.offset() < off as u64 && c.next_into(&mut got).unwrap() {}
                let o = c.offset();
                let mut d = m.cursor(Kind::SmtpWrap, o, 1000).unwrap();
                got.extend(collect(&mut d));
                assert!(got == whole, "resumed at {o}");
            }
        }
        // no long line: smtp's loop, same output
        let p = make(t.path(), "s", b"a\n.b\n", b"");
        let m = MessageFile::open(&p).unwrap();
        let c = m.cursor(Kind::SmtpWrap, 0, 10).unwrap();
        assert_eq!(c.kind(), Kind::Smtp);
    }

    #[test]
    fn parallel_cursors_in_threads() {
        let t = TempDir::new();
        let msg = sample_message();
        let p = make(t.path(), "m", &msg, b"{}");
        let m = Arc::new(MessageFile::open(&p).unwrap());
        let want = transform_all(Kind::Smtp, &msg);
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    let mut c = m.cursor(Kind::Smtp, 0, 1000 + i * 17).unwrap();
                    collect(&mut c)
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().unwrap() == want);
        }
    }

    #[test]
    fn shared_fd_offset_is_never_moved() {
        let t = TempDir::new();
        let msg = sample_message();
        let p = make(t.path(), "m", &msg, b"{}");
        let m = MessageFile::open(&p).unwrap();
        // Someone else moves the shared offset: cursors do not care, and do not move it.
        let fd = m.fileno().unwrap();
        // SAFETY: lseek on our own open descriptor.
        assert_eq!(unsafe { libc::lseek(fd, 12345, libc::SEEK_SET) }, 12345);
        let mut c = m.cursor(Kind::Raw, 0, 4096).unwrap();
        assert!(collect(&mut c) == msg);
        m.verify().unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }, 12345);
    }

    #[test]
    fn forked_child_reads_alongside_parent() {
        let t = TempDir::new();
        let msg = sample_message();
        let p = make(t.path(), "m", &msg, b"{}");
        let m = MessageFile::open(&p).unwrap();
        let out = t.path().join("child-out");
        let out_c = std::ffi::CString::new(out.to_str().unwrap()).unwrap();
        // SAFETY: the child only calls async-signal-safe-enough code paths (pread/write) and
        // leaves with _exit; the test harness may have other threads, which we do not touch.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: raw open/write/_exit in the child.
            unsafe {
                let fd = libc::open(out_c.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o600);
                let ok = fd >= 0 && m.send_to(fd, Kind::Smtp, 777).is_ok();
                libc::_exit(if ok { 0 } else { 1 });
            }
        }
        let mut sink = File::create(t.path().join("parent-out")).unwrap();
        let n = m.send_to(sink.as_raw_fd(), Kind::Smtp, 1000).unwrap();
        let mut status = 0;
        // SAFETY: waiting for our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(status, 0);
        let want = transform_all(Kind::Smtp, &msg);
        assert_eq!(n, want.len() as u64);
        sink.seek(SeekFrom::Start(0)).unwrap();
        assert!(std::fs::read(t.path().join("parent-out")).unwrap() == want);
        let mut child = Vec::new();
        File::open(&out).unwrap().read_to_end(&mut child).unwrap();
        assert!(child == want);
    }

    #[test]
    fn a_cursor_from_the_start_refuses_to_finish_a_damaged_message() {
        let t = TempDir::new();
        let body: Vec<u8> = (0..50_000u32)
            .flat_map(|i| format!("line {i} of the message\n").into_bytes())
            .collect();
        let p = make(t.path(), "q", &body, b"{}");
        // Flip one byte of the message after the footer was written.
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[body.len() - 10] ^= 0x20;
        std::fs::write(&p, &bytes).unwrap();
        let m = MessageFile::open(&p).unwrap();
        for kind in [Kind::Raw, Kind::Crlf, Kind::Smtp, Kind::Mbox] {
            // Small chunks: the damage is found only when the last one is read.
            let mut c = m.cursor(kind, 0, 4096).unwrap();
            let mut out = Vec::new();
            let err = loop {
                match c.next_into(&mut out) {
                    Ok(true) => continue,
                    Ok(false) => panic!("{kind:?}: a damaged message streamed to its end"),
                    Err(e) => break e,
                }
            };
            assert!(err.to_string().contains("CRC mismatch"), "{err}");
            assert!(
                !out.windows(11).any(|w| w == b"line 49999 "),
                "{kind:?}: the last chunk was returned"
            );
            assert!(
                !out.ends_with(b".\r\n"),
                "{kind:?}: the terminator was returned"
            );
            // And it stays refused.
            assert!(c.next_into(&mut out).is_err());
        }
        // A cursor started midway cannot check the whole message and does not try.
        let mut c = m.cursor(Kind::Raw, 10, 4096).unwrap();
        let mut out = Vec::new();
        while c.next_into(&mut out).unwrap() {}
        assert_eq!(out.len(), body.len() - 10);
        // send_to stops before the end too.
        let out_path = t.path().join("out");
        let f = File::create(&out_path).unwrap();
        assert!(m.send_to(f.as_raw_fd(), Kind::Smtp, 4096).is_err());
        let sent = std::fs::read(&out_path).unwrap();
        assert!(!sent.windows(11).any(|w| w == b"line 49999 ") && !sent.ends_with(b".\r\n"));
        // The intact message streams as before.
        let good = make(t.path(), "g", &body, b"{}");
        let g = MessageFile::open(&good).unwrap();
        let mut c = g.cursor(Kind::Smtp, 0, 4096).unwrap();
        let mut out = Vec::new();
        while c.next_into(&mut out).unwrap() {}
        assert!(out.ends_with(b".\r\n"));
    }

    #[test]
    fn send_to_append_to_and_errors() {
        let t = TempDir::new();
        let msg = b"From me\nbody";
        let p = make(t.path(), "m", msg, b"");
        let m = MessageFile::open(&p).unwrap();
        let mbox = t.path().join("mbox");
        let f = File::options()
            .create(true)
            .append(true)
            .open(&mbox)
            .unwrap();
        f.set_len(0).unwrap();
        let n = m.append_to(f.as_raw_fd(), Kind::Mbox, true).unwrap();
        let n2 = m.append_to(f.as_raw_fd(), Kind::Mbox, false).unwrap();
        assert_eq!(n, n2);
        assert_eq!(
            std::fs::read(&mbox).unwrap(),
            b">From me\nbody\n\n>From me\nbody\n\n"
        );
        // /dev/full: ENOSPC with the file name
        if let Ok(full) = File::options().write(true).open("/dev/full") {
            let e = m.send_to(full.as_raw_fd(), Kind::Raw, 10).unwrap_err();
            match e {
                CoreError::Io { source, path } => {
                    assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
                    assert_eq!(path.as_deref(), Some(Path::new("/dev/full")));
                }
                other => panic!("{other:?}"),
            }
        }
        // a closed pipe: EPIPE, no file name
        let mut fds = [0; 2];
        // SAFETY: valid array; we close both ends below.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            libc::close(fds[0]);
        }
        let e = m.send_to(fds[1], Kind::Smtp, 10).unwrap_err();
        assert_eq!(e.raw_errno(), Some(libc::EPIPE));
        // SAFETY: our pipe end.
        unsafe { libc::close(fds[1]) };
    }

    #[test]
    fn close_while_cursor_alive() {
        let t = TempDir::new();
        let msg = vec![b'a'; 10_000];
        let p = make(t.path(), "m", &msg, b"");
        let m = MessageFile::open(&p).unwrap();
        let fd = m.fileno().unwrap();
        let mut c = m.cursor(Kind::Raw, 0, 100).unwrap();
        let mut buf = Vec::new();
        assert!(c.next_into(&mut buf).unwrap());
        m.close();
        // the descriptor is really closed now (no read was in flight)
        assert_ne!(m.shared.state.load(Ordering::Acquire) & DONE, 0);
        let _ = fd;
        assert!(matches!(c.next_into(&mut buf), Err(CoreError::Usage(_))));
        assert!(matches!(
            m.cursor(Kind::Raw, 0, 1),
            Err(CoreError::Usage(_))
        ));
        drop(c);
        drop(m);
    }
}
