//! `SpoolWriter`: streams a submitted message from a descriptor into a new spool file and
//! commits it. Never holds the whole message: input is read in 1 MiB chunks and written out as
//! it is normalised.
//!
//! Life cycle and what a crash at each step leaves behind (see docs/internals.md):
//! 1. `new` creates `tmp/ID` (O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC, 0600) and takes
//!    `flock(LOCK_EX)` on that descriptor, held until commit/abort/drop. Crash from here until
//!    the rename in `commit`: `tmp/ID` debris, which queue runs delete. The kernel drops the
//!    lock of a dead process, so debris is unlocked while a live writer's file is locked.
//! 2. `read_head` / `write_head` / `stream_rest` fill the message part (an input pipe is first
//!    grown to `CHUNK` bytes where the system allows, so that reads from it are as large). Every
//!    `WRITEBACK_CHUNK` bytes, writeback of what was written is started (a hint to the
//!    kernel, Linux only; durability still rests on the fsync in `commit` alone).
//! 3. `commit(envelope, Some(queue/ID))` appends envelope and footer, fsyncs the file, renames
//!    it to `queue/ID` without replacing anything, then fsyncs `queue/` and `tmp/`, then
//!    unlocks and closes. Crash after the rename: a complete message. If anything fails after
//!    the rename, the rename is undone (best effort, still under the lock) so that an error
//!    from `commit` means "not queued".
//!    `commit(envelope, None)` commits in place: the file was created at its final name;
//!    envelope and footer are appended, the file and (if it can be opened: a drop directory
//!    may be write-only for the submitter) its directory fsynced, then it is unlocked. On any
//!    error the file is removed before the lock is released.
//!
//! `abort` (or dropping an uncommitted writer in the process that created it) removes the
//! temporary file, then closes it (so nobody sees it unlocked before it is gone).
//!
//! Reading input can be interrupted by a signal (EINTR): the call returns that error with all
//! state kept, and calling the same method again resumes. Every other error leaves the writer
//! failed: only `abort` is then allowed.

use crate::error::{CoreError, Result};
use crate::footer::{Footer, MAX_MSG_LEN};
use crate::io;
use crate::transform::{Normalizer, Stats};
use std::fs::File;
use std::io::Write;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// Size of one read from the input and of one write to the spool file.
pub const CHUNK: usize = 1 << 20;

/// Output of at least this many bytes that is an unchanged run of the input is written from
/// the input buffer rather than copied to the output buffer first.
const DIRECT_MIN: usize = CHUNK / 2;

/// Writeback of the message is started every time this many bytes have been written since
/// the last start (see `io::start_writeback`), so that the commit's `fsync` waits for the
/// tail only instead of the whole message. Measured on ext4 (70 MB, stream + commit,
/// medians): none 114 ms, 1 MiB 82, 2 MiB 71, 4 MiB 71, 8 MiB 75, 16 MiB 92.
pub const WRITEBACK_CHUNK: u64 = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Fresh,
    /// `read_head` started but was interrupted by a signal.
    ReadingHead,
    /// Head read and/or written; the rest is not streamed yet.
    HeadDone,
    /// `stream_rest` started but was interrupted by a signal.
    Streaming,
    Streamed,
    Committed,
    Aborted,
    Failed,
}

pub struct SpoolWriter {
    path: PathBuf,
    file: Option<File>,
    input: RawFd,
    norm: Normalizer,
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    head: Vec<u8>,
    out: Vec<u8>,
    stats: Stats,
    phase: Phase,
    creator: u32,
    /// Writeback has been started for the file's bytes before this offset.
    wb_start: u64,
    /// Start writeback every this many bytes; 0 once the file system refused.
    wb_chunk: u64,
}

impl SpoolWriter {
    /// Create `path` and prepare to read the message from `input` (not closed, not owned).
    pub fn create(path: &Path, input: RawFd, dot_ends: bool) -> Result<SpoolWriter> {
        if input < 0 {
            return Err(CoreError::usage(format!(
                "invalid input descriptor {input}"
            )));
        }
        let file = io::create_excl(path).map_err(|e| CoreError::io(e, path))?;
        // Reads of CHUNK bytes from a pipe too (a 64 KiB pipe made 70 MB take 1,070 reads and
        // writer wake-ups: stream 72 -> 63 ms).
        io::grow_pipe(input, CHUNK);
        // Locked from the start, on the writing descriptor: a queue runner's
        // flock(LOCK_EX|LOCK_NB) on its own descriptor fails while this writer lives.
        if let Err(e) = io::flock(file.as_raw_fd(), libc::LOCK_EX) {
            let _ = std::fs::remove_file(path);
            return Err(CoreError::io(e, path));
        }
        Ok(SpoolWriter {
            path: path.to_path_buf(),
            file: Some(file),
            input,
            norm: Normalizer::new(dot_ends),
            inbuf: Vec::new(),
            start: 0,
            end: 0,
            eof: false,
            head: Vec::new(),
            out: Vec::new(),
            stats: Stats::new(),
            phase: Phase::Fresh,
            creator: std::process::id(),
            wb_start: 0,
            wb_chunk: WRITEBACK_CHUNK,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Bytes written to the message part so far.
    pub fn size(&self) -> u64 {
        self.stats.size()
    }
    pub fn eight_bit(&self) -> bool {
        self.stats.eight_bit()
    }
    pub fn max_line(&self) -> u64 {
        self.stats.max_line()
    }
    /// LF bytes in the message part written so far (counted in the same pass that finds the
    /// longest line). Complete once `stream_rest` has returned: before that, output still
    /// buffered is not counted. A last line without LF is not counted.
    pub fn lines(&self) -> u64 {
        self.stats.lines()
    }
    pub fn crc32(&self) -> u32 {
        self.stats.crc32()
    }

    fn order_error(&self, what: &str) -> CoreError {
        let why = match self.phase {
            Phase::Committed => "the message is already committed".to_string(),
            Phase::Aborted => "the writer was aborted".to_string(),
            Phase::Failed => "an earlier call failed; call abort()".to_string(),
            p => format!("not allowed in state {p:?}"),
        };
        CoreError::usage(format!("SpoolWriter.{what}(): {why}"))
    }

    /// Record a failure: EINTR keeps the state (the call can be repeated), anything else fails
    /// the writer.
    fn check<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if !e.is_interrupted() {
                self.phase = Phase::Failed;
            }
        }
        r
    }

    /// Read more input into the buffer (compacting first). Sets `eof` at end of input.
    fn fill(&mut self) -> Result<()> {
        if self.start > 0 {
            self.inbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.inbuf.len() < self.end + CHUNK {
            self.inbuf.resize(self.end + CHUNK, 0);
        }
        let n =
            io::read_fd(self.input, &mut self.inbuf[self.end..self.end + CHUNK]).map_err(|e| {
                CoreError::Io {
                    source: e,
                    path: io::fd_path(self.input),
                }
            })?;
        if n == 0 {
            self.eof = true;
        } else {
            self.end += n;
        }
        Ok(())
    }

    /// Write the pending output to the file and account for it.
    fn flush(&mut self) -> Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let r = self.write_out(&out);
        self.out = out;
        self.out.clear();
        r
    }

    /// Write `data` to the message part and account for it.
    fn write_out(&mut self, data: &[u8]) -> Result<()> {
        if self.stats.size() + data.len() as u64 > MAX_MSG_LEN {
            return Err(CoreError::errno(libc::EFBIG, &self.path));
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| CoreError::usage("SpoolWriter: file is closed"))?;
        file.write_all(data)
            .map_err(|e| CoreError::io(e, &self.path))?;
        self.stats.update(data);
        self.writeback();
        Ok(())
    }

    /// Normalise the buffered input. The output of one call is a few ranges of the input
    /// (one when it needs no change, as LF-only text); a single range of at least
    /// `DIRECT_MIN` bytes with nothing buffered before it is written straight from the input
    /// buffer, other output is collected in `out`.
    fn normalise(&mut self) -> Result<()> {
        let input = &self.inbuf[self.start..self.end];
        let out = &mut self.out;
        let mut single = None;
        let n = self.norm.feed_ranges(input, self.eof, |r| {
            if single.is_none() && out.is_empty() {
                single = Some(r);
            } else {
                if let Some(first) = single.take() {
                    out.extend_from_slice(&input[first]);
                }
                out.extend_from_slice(&input[r]);
            }
        });
        let base = self.start;
        self.start += n;
        match single {
            Some(r) if r.len() >= DIRECT_MIN => {
                let inbuf = std::mem::take(&mut self.inbuf);
                let res = self.write_out(&inbuf[base + r.start..base + r.end]);
                self.inbuf = inbuf;
                res
            }
            Some(r) => {
                self.out
                    .extend_from_slice(&self.inbuf[base + r.start..base + r.end]);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Start writeback of what was written since the last start, once that is at least
    /// `wb_chunk` bytes. A hint: its failure is never an error (fsync decides durability).
    fn writeback(&mut self) {
        let end = self.stats.size();
        if self.wb_chunk == 0 || end - self.wb_start < self.wb_chunk {
            return;
        }
        let Some(file) = self.file.as_ref() else {
            return;
        };
        match io::start_writeback(file.as_raw_fd(), self.wb_start, end - self.wb_start) {
            io::Writeback::Started => self.wb_start = end,
            io::Writeback::Skipped => {}
            io::Writeback::Unsupported => self.wb_chunk = 0,
        }
    }

    /// The head block of the input, CRLF -> LF: up to and including the first empty line, or
    /// up to the lone-dot line (consumed, not returned; input then ends), or EOF, or `limit`
    /// bytes (cut after the last whole line that fits, or exactly at `limit` when even the
    /// first line does not fit). Nothing is written; input read beyond the head is kept for
    /// `stream_rest`.
    pub fn read_head(&mut self, limit: usize) -> Result<Vec<u8>> {
        match self.phase {
            Phase::Fresh => self.phase = Phase::ReadingHead,
            Phase::ReadingHead => {}
            _ => return Err(self.order_error("read_head")),
        }
        loop {
            let (n, done) = self.norm.feed_head(
                &self.inbuf[self.start..self.end],
                self.eof,
                &mut self.head,
                limit,
            );
            self.start += n;
            if done {
                self.phase = Phase::HeadDone;
                return Ok(std::mem::take(&mut self.head));
            }
            let r = self.fill();
            self.check(r)?;
        }
    }

    /// Write bytes (the head as Python rewrote it) to the message part. May be called more
    /// than once, before `stream_rest`.
    pub fn write_head(&mut self, data: &[u8]) -> Result<()> {
        match self.phase {
            Phase::Fresh | Phase::HeadDone => self.phase = Phase::HeadDone,
            _ => return Err(self.order_error("write_head")),
        }
        self.out.extend_from_slice(data);
        if self.out.len() >= CHUNK {
            let r = self.flush();
            self.check(r)?;
        }
        Ok(())
    }

    /// Stream the rest of the input into the message part, CRLF -> LF, until EOF or the
    /// lone-dot line.
    pub fn stream_rest(&mut self) -> Result<()> {
        match self.phase {
            Phase::Fresh | Phase::HeadDone | Phase::Streaming => self.phase = Phase::Streaming,
            _ => return Err(self.order_error("stream_rest")),
        }
        loop {
            let r = self.normalise();
            self.check(r)?;
            if self.norm.finished() || self.out.len() >= CHUNK {
                let r = self.flush();
                self.check(r)?;
            }
            if self.norm.finished() {
                self.phase = Phase::Streamed;
                self.inbuf = Vec::new();
                self.start = 0;
                self.end = 0;
                return Ok(());
            }
            let r = self.fill();
            self.check(r)?;
        }
    }

    /// Append the envelope and the footer and fsync. With `dest`, rename to `dest` (never
    /// replacing an existing file) and fsync the destination and source directories. Without,
    /// commit in place: fsync the file's directory, tolerating EACCES/EPERM when it cannot be
    /// opened; on error the file is removed. The lock is released last.
    pub fn commit(&mut self, envelope: &[u8], dest: Option<&Path>) -> Result<()> {
        if self.phase != Phase::Streamed {
            return Err(self.order_error("commit"));
        }
        let r = match dest {
            Some(dest) => self.commit_rename(envelope, dest),
            None => self.commit_in_place(envelope),
        };
        match &r {
            Ok(()) => {
                self.phase = Phase::Committed;
                self.release();
            }
            Err(_) if dest.is_none() => {
                // Remove while still locked, then unlock: nobody may find a complete-looking
                // unlocked file after a failed commit.
                let _ = std::fs::remove_file(&self.path);
                self.phase = Phase::Aborted;
                self.release();
            }
            Err(_) => self.phase = Phase::Failed,
        }
        r
    }

    /// Unlock (for every descriptor sharing the open file, a forked child's too) and close.
    fn release(&mut self) {
        if let Some(file) = self.file.take() {
            let _ = io::flock(file.as_raw_fd(), libc::LOCK_UN);
        }
    }

    /// Flush the message, append envelope and footer, fsync the file.
    fn finish_file(&mut self, envelope: &[u8]) -> Result<()> {
        let env_len = u32::try_from(envelope.len())
            .map_err(|_| CoreError::usage("envelope larger than 4 GiB"))?;
        self.flush()?;
        let footer = Footer {
            msg_len: self.stats.size(),
            env_len,
            msg_crc: self.stats.crc32(),
            env_crc: crc32fast::hash(envelope),
            eight_bit: self.stats.eight_bit(),
            max_line: self.stats.max_line(),
        };
        let path = &self.path;
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| CoreError::usage("SpoolWriter: file is closed"))?;
        let ioerr = |e| CoreError::io(e, path);
        file.write_all(envelope).map_err(ioerr)?;
        file.write_all(&footer.encode()).map_err(ioerr)?;
        io::fsync_fd(file.as_raw_fd()).map_err(ioerr)
    }

    fn commit_rename(&mut self, envelope: &[u8], dest: &Path) -> Result<()> {
        self.finish_file(envelope)?;
        io::rename_noreplace(&self.path, dest).map_err(|e| CoreError::io(e, dest))?;
        // From here the message is visible in the queue (still locked). Make the rename
        // durable.
        let dest_dir = io::parent_dir(dest);
        let src_dir = io::parent_dir(&self.path);
        let mut synced = io::fsync_dir(&dest_dir).map_err(|e| CoreError::io(e, &dest_dir));
        if synced.is_ok() && src_dir != dest_dir {
            synced = io::fsync_dir(&src_dir).map_err(|e| CoreError::io(e, &src_dir));
        }
        if synced.is_err() {
            // Undo, so that a failed commit never leaves a message the caller thinks was
            // refused (it would be delivered and then submitted again).
            let _ = std::fs::remove_file(dest);
            self.release();
        }
        synced
    }

    fn commit_in_place(&mut self, envelope: &[u8]) -> Result<()> {
        self.finish_file(envelope)?;
        let dir = io::parent_dir(&self.path);
        match io::fsync_dir(&dir) {
            Ok(()) => Ok(()),
            // A submitter may write into a drop directory it cannot read (mode 1733): the
            // entry was made by its own O_EXCL create, which is all it can do.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) => Ok(()),
            Err(e) => Err(CoreError::io(e, &dir)),
        }
    }

    /// Remove the temporary file. Idempotent; after a successful commit it does nothing.
    pub fn abort(&mut self) -> Result<()> {
        match self.phase {
            Phase::Committed | Phase::Aborted => return Ok(()),
            _ => {}
        }
        self.phase = Phase::Aborted;
        self.inbuf = Vec::new();
        self.out = Vec::new();
        // Unlink first, then close (which drops the lock): the file is never seen unlocked.
        let r = match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(CoreError::io(e, &self.path)),
        };
        self.file = None;
        r
    }

    /// True once committed or aborted.
    pub fn closed(&self) -> bool {
        matches!(self.phase, Phase::Committed | Phase::Aborted)
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        // Only the process that created the file removes it: a forked child that drops its
        // copy of the writer must not delete the parent's message.
        if !self.closed() && std::process::id() == self.creator {
            let _ = self.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::testutil::TempDir;
    use crate::reader::MessageFile;
    use std::os::unix::io::AsRawFd;

    /// An input descriptor with `data` in it: a pipe written by a thread (so large inputs do
    /// not block), or a regular file.
    enum Input {
        Pipe(RawFd, Option<std::thread::JoinHandle<()>>),
        File(File),
    }

    impl Input {
        fn pipe(data: &[u8]) -> Input {
            let mut fds = [0; 2];
            // SAFETY: valid array of two ints.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            let data = data.to_vec();
            let w = fds[1];
            let h = std::thread::spawn(move || {
                let mut off = 0;
                while off < data.len() {
                    // Small writes so reads see many chunk boundaries.
                    let end = (off + 4093).min(data.len());
                    match io::write_fd(w, &data[off..end]) {
                        Ok(n) => off += n,
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                        Err(_) => break, // the reader stopped early (lone dot)
                    }
                }
                // SAFETY: closing our write end.
                unsafe { libc::close(w) };
            });
            Input::Pipe(fds[0], Some(h))
        }
        fn file(dir: &Path, data: &[u8]) -> Input {
            let p = dir.join("input");
            std::fs::write(&p, data).unwrap();
            Input::File(File::open(&p).unwrap())
        }
        fn fd(&self) -> RawFd {
            match self {
                Input::Pipe(fd, _) => *fd,
                Input::File(f) => f.as_raw_fd(),
            }
        }
    }

    impl Drop for Input {
        fn drop(&mut self) {
            if let Input::Pipe(fd, h) = self {
                // SAFETY: closing our read end.
                unsafe { libc::close(*fd) };
                if let Some(h) = h.take() {
                    let _ = h.join();
                }
            }
        }
    }

    fn retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
        loop {
            match f() {
                Err(e) if e.is_interrupted() => continue,
                r => return r,
            }
        }
    }

    /// Submit `input` through a writer: head read, written back unchanged, rest streamed,
    /// committed. Returns (head, stored message, writer stats).
    fn submit(input: &[u8], dot_ends: bool, limit: usize) -> (Vec<u8>, Vec<u8>, u64, bool, u64) {
        let t = TempDir::new();
        let inp = Input::pipe(input);
        let tmp = t.path().join("tmp");
        let mut w = SpoolWriter::create(&tmp, inp.fd(), dot_ends).unwrap();
        let head = retry(|| w.read_head(limit)).unwrap();
        w.write_head(&head).unwrap();
        retry(|| w.stream_rest()).unwrap();
        let (size, eb, ml, lines) = (w.size(), w.eight_bit(), w.max_line(), w.lines());
        let dest = t.path().join("dest");
        w.commit(b"{\"v\":1}", Some(&dest)).unwrap();
        assert!(!tmp.exists());
        let m = MessageFile::open(&dest).unwrap();
        m.verify().unwrap();
        assert_eq!(m.size(), size);
        assert_eq!(m.eight_bit(), eb);
        assert_eq!(m.max_line(), ml);
        assert_eq!(m.envelope(), b"{\"v\":1}");
        let stored = m.read_all().unwrap();
        assert_eq!(stored.len() as u64, size);
        assert_eq!(lines, count_lf(&stored));
        (head, stored, size, eb, ml)
    }

    fn count_lf(data: &[u8]) -> u64 {
        data.iter().filter(|&&b| b == b'\n').count() as u64
    }

    /// Stream `input` from a regular file (each read returns a whole `CHUNK`) without a head
    /// step; returns (stored message, lines).
    fn submit_file(input: &[u8], dot_ends: bool) -> (Vec<u8>, u64) {
        let t = TempDir::new();
        let inp = Input::file(t.path(), input);
        let tmp = t.path().join("tmp");
        let mut w = SpoolWriter::create(&tmp, inp.fd(), dot_ends).unwrap();
        retry(|| w.stream_rest()).unwrap();
        let lines = w.lines();
        let dest = t.path().join("q");
        w.commit(b"{}", Some(&dest)).unwrap();
        let stored = MessageFile::open(&dest).unwrap().read_all().unwrap();
        assert_eq!(lines, count_lf(&stored));
        (stored, lines)
    }

    #[test]
    fn lines_counted() {
        // CRLF input: one LF per CRLF; a bare CR is no line end.
        let (_, stored, ..) = submit(b"A: 1\r\n\r\nx\ry\r\nz\r\n", true, 1 << 20);
        assert_eq!(stored, b"A: 1\n\nx\ry\nz\n");
        assert_eq!(submit_file(b"A: 1\r\n\r\nx\ry\r\nz\r\n", true).1, 4);
        // bare LF
        assert_eq!(submit_file(b"a\nb\n\nc\n", true).1, 4);
        // no final newline: the last line is not an LF
        assert_eq!(
            submit_file(b"a\r\nb\r\nlast", true),
            (b"a\nb\nlast".to_vec(), 2)
        );
        assert_eq!(submit_file(b"a\nlast\r", false), (b"a\nlast\r".to_vec(), 1));
        // -i off (dot_ends): input ends at a lone ".", which is not stored
        assert_eq!(
            submit_file(b"a\r\nb\r\n.\r\nafter\n", true),
            (b"a\nb\n".to_vec(), 2)
        );
        assert_eq!(submit_file(b"a\nb\n.", true), (b"a\nb\n".to_vec(), 2));
        assert_eq!(submit_file(b"a\nb\n.\n", true), (b"a\nb\n".to_vec(), 2));
        // ... and with -i the dot line is data
        assert_eq!(submit_file(b"a\n.\nb\n", false).1, 3);
        // empty message, and one that is only the lone dot
        assert_eq!(submit_file(b"", true), (Vec::new(), 0));
        assert_eq!(submit_file(b".\r\n", true), (Vec::new(), 0));
        let (_, stored, ..) = submit(b"", true, 1 << 20);
        assert!(stored.is_empty());
    }

    #[test]
    fn lines_across_read_chunks() {
        // Lines split across the 1 MiB reads of a regular file: a CRLF whose CR ends one read
        // and whose LF starts the next, a line spanning a whole read, and an LF as the last
        // byte of a read; then the same through a pipe (4093-byte writes).
        let mut input = vec![b'x'; CHUNK - 1];
        input.extend_from_slice(b"\r\n");
        input.extend(std::iter::repeat_n(b'y', CHUNK + 10));
        input.extend_from_slice(b"\r\n");
        let pad = 3 * CHUNK - 1 - input.len();
        input.extend(std::iter::repeat_n(b'z', pad));
        input.push(b'\n');
        let mut i = 0u32;
        while input.len() < 5 * CHUNK {
            input.extend_from_slice(format!("short line {i}\r\n").as_bytes());
            i += 1;
        }
        input.extend_from_slice(b"tail");
        let want_lf = 3 + u64::from(i);
        let (stored, lines) = submit_file(&input, true);
        assert_eq!(lines, want_lf);
        assert_eq!(stored.len(), input.len() - (want_lf as usize - 1));
        let (_, stored_pipe, ..) = submit(&input, true, 1 << 20);
        assert!(stored_pipe == stored);
    }

    #[test]
    fn crlf_normalised_and_dot_ends() {
        let input = b"Subject: hi\r\nTo: x\r\n\r\nline 1\r\nbare\rcr\r\n..dots\r\n.\r\nafter\r\n";
        let (head, stored, size, eb, ml) = submit(input, true, 1 << 20);
        assert_eq!(head, b"Subject: hi\nTo: x\n\n");
        assert_eq!(stored, b"Subject: hi\nTo: x\n\nline 1\nbare\rcr\n..dots\n");
        assert_eq!(size, stored.len() as u64);
        assert!(!eb);
        assert_eq!(ml, 11);
        let (_, stored, ..) = submit(input, false, 1 << 20);
        assert_eq!(
            stored,
            b"Subject: hi\nTo: x\n\nline 1\nbare\rcr\n..dots\n.\nafter\n"
        );
    }

    #[test]
    fn dot_in_head_ends_input() {
        let (head, stored, ..) = submit(b"Subject: a\n.\nmore\n", true, 1 << 20);
        assert_eq!(head, b"Subject: a\n");
        assert_eq!(stored, b"Subject: a\n");
    }

    #[test]
    fn head_limit_and_rest() {
        let input = b"A: 1234\nB: 5678\n\nbody\n";
        let (head, stored, ..) = submit(input, true, 12);
        assert_eq!(head, b"A: 1234\n");
        assert_eq!(stored, input);
        let (head, stored, ..) = submit(input, true, 3);
        assert_eq!(head, b"A: ");
        assert_eq!(stored, input);
    }

    #[test]
    fn eight_bit_size_crc_and_long_lines() {
        let mut input = b"Subject: x\n\n".to_vec();
        input.extend(std::iter::repeat_n(b'a', 10_000));
        input.extend_from_slice(b"\n\xc3\xa9\0\n");
        let (_, stored, size, eb, ml) = submit(&input, true, 1 << 20);
        assert_eq!(stored, input);
        assert_eq!(size, input.len() as u64);
        assert!(eb);
        assert_eq!(ml, 10_000);
    }

    #[test]
    fn large_input_across_chunks() {
        // 3.5 MiB with CRLF line ends and a CR/LF straddling every 4093-byte pipe write.
        let mut input = Vec::new();
        let mut i = 0u32;
        while input.len() < 3_500_000 {
            input.extend_from_slice(format!("line {i} .x From y\r\n").as_bytes());
            if i.is_multiple_of(97) {
                input.extend_from_slice(b".\r\r\n");
            }
            i += 1;
        }
        let expected: Vec<u8> = {
            let mut n = Normalizer::new(true);
            let mut out = Vec::new();
            n.feed(&input, true, &mut out);
            out
        };
        let (_, stored, ..) = submit(&input, true, 1 << 20);
        assert_eq!(stored.len(), expected.len());
        assert!(stored == expected);
    }

    #[test]
    fn regular_file_input_and_no_head() {
        let t = TempDir::new();
        let inp = Input::file(t.path(), b"a\r\nb");
        let tmp = t.path().join("tmp");
        let mut w = SpoolWriter::create(&tmp, inp.fd(), true).unwrap();
        retry(|| w.stream_rest()).unwrap();
        assert_eq!(w.size(), 3);
        let dest = t.path().join("q");
        w.commit(b"", Some(&dest)).unwrap();
        let m = MessageFile::open(&dest).unwrap();
        assert_eq!(m.read_all().unwrap(), b"a\nb");
        assert_eq!(m.envelope(), b"");
    }

    #[test]
    fn commit_refuses_to_replace() {
        let t = TempDir::new();
        let inp = Input::pipe(b"x\n");
        let tmp = t.path().join("tmp");
        let dest = t.path().join("dest");
        std::fs::write(&dest, b"existing").unwrap();
        let mut w = SpoolWriter::create(&tmp, inp.fd(), true).unwrap();
        retry(|| w.stream_rest()).unwrap();
        let e = w.commit(b"{}", Some(&dest)).unwrap_err();
        match e {
            CoreError::Io { source, path } => {
                assert_eq!(source.raw_os_error(), Some(libc::EEXIST));
                assert_eq!(path.as_deref(), Some(dest.as_path()));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&dest).unwrap(), b"existing");
        // failed: only abort is allowed now, and it removes the temp file
        assert!(matches!(w.stream_rest(), Err(CoreError::Usage(_))));
        w.abort().unwrap();
        assert!(!tmp.exists());
        w.abort().unwrap();
    }

    #[test]
    fn create_refuses_existing_temp() {
        let t = TempDir::new();
        let tmp = t.path().join("tmp");
        std::fs::write(&tmp, b"").unwrap();
        let e = SpoolWriter::create(&tmp, 0, true).err().expect("must fail");
        assert_eq!(e.raw_errno(), Some(libc::EEXIST));
        let e = SpoolWriter::create(&t.path().join("nodir/x"), 0, true)
            .err()
            .expect("must fail");
        assert_eq!(e.raw_errno(), Some(libc::ENOENT));
    }

    #[test]
    fn wrong_order_is_usage_error() {
        let t = TempDir::new();
        let inp = Input::pipe(b"A: b\n\nc\n");
        let tmp = t.path().join("tmp");
        let mut w = SpoolWriter::create(&tmp, inp.fd(), true).unwrap();
        assert!(matches!(
            w.commit(b"", Some(&t.path().join("d"))),
            Err(CoreError::Usage(_))
        ));
        retry(|| w.read_head(100)).unwrap();
        assert!(matches!(w.read_head(100), Err(CoreError::Usage(_))));
        retry(|| w.stream_rest()).unwrap();
        assert!(matches!(w.write_head(b"x"), Err(CoreError::Usage(_))));
        assert!(matches!(w.stream_rest(), Err(CoreError::Usage(_))));
        w.commit(b"", Some(&t.path().join("d"))).unwrap();
        assert!(matches!(
            w.commit(b"", Some(&t.path().join("e"))),
            Err(CoreError::Usage(_))
        ));
        // abort after commit keeps the committed file
        w.abort().unwrap();
        assert!(t.path().join("d").exists());
    }

    #[test]
    fn abort_and_drop_remove_temp() {
        let t = TempDir::new();
        let inp = Input::pipe(b"x");
        let tmp = t.path().join("tmp");
        let mut w = SpoolWriter::create(&tmp, inp.fd(), true).unwrap();
        assert!(tmp.exists());
        w.abort().unwrap();
        assert!(!tmp.exists());
        w.abort().unwrap();
        assert!(matches!(w.stream_rest(), Err(CoreError::Usage(_))));
        {
            let _w = SpoolWriter::create(&tmp, inp.fd(), true).unwrap();
            assert!(tmp.exists());
        }
        assert!(!tmp.exists());
    }

    /// Streams `inp` into a writer whose file is /dev/full (the open works, every write
    /// fails with ENOSPC) and checks that the error names the temp file; None without
    /// /dev/full.
    fn stream_into_full_disk(t: &TempDir, inp: &Input) -> Option<(SpoolWriter, PathBuf)> {
        let full = File::options().write(true).open("/dev/full").ok()?;
        let tmp = t.path().join("tmp");
        let mut w = SpoolWriter::create(&tmp, inp.fd(), true).unwrap();
        w.file = Some(full);
        match retry(|| w.stream_rest()).unwrap_err() {
            CoreError::Io { source, path } => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
                assert_eq!(path.as_deref(), Some(tmp.as_path()));
            }
            other => panic!("{other:?}"),
        }
        Some((w, tmp))
    }

    #[test]
    fn write_error_is_reported_with_path() {
        let t = TempDir::new();
        let inp = Input::pipe(&vec![b'x'; 3 * CHUNK]);
        let Some((mut w, tmp)) = stream_into_full_disk(&t, &inp) else {
            return;
        };
        w.abort().unwrap();
        assert!(!tmp.exists());
    }

    #[test]
    fn unchanged_runs_written_from_input_buffer() {
        // LF-only text from a regular file: whole reads pass through unchanged (written from
        // the input buffer); a head written first, a CRLF and a lone dot late in the input
        // switch back to copying.
        let mut body = Vec::new();
        let mut i = 0u32;
        while body.len() < 3 * CHUNK + 12_345 {
            body.extend_from_slice(format!("line {i} .x\n..dot\n").as_bytes());
            i += 1;
        }
        let mut input = b"Subject: big\n\n".to_vec();
        input.extend_from_slice(&body);
        input.extend_from_slice(b"crlf\r\n.\r\nnot message\n");
        let mut want = b"Subject: big\n\n".to_vec();
        want.extend_from_slice(&body);
        want.extend_from_slice(b"crlf\n");
        for dot_ends in [true, false] {
            let t = TempDir::new();
            let inp = Input::file(t.path(), &input);
            let tmp = t.path().join("tmp");
            let mut w = SpoolWriter::create(&tmp, inp.fd(), dot_ends).unwrap();
            let head = retry(|| w.read_head(1 << 20)).unwrap();
            assert_eq!(head, b"Subject: big\n\n");
            w.write_head(&head).unwrap();
            retry(|| w.stream_rest()).unwrap();
            let (size, lines, ml) = (w.size(), w.lines(), w.max_line());
            let dest = t.path().join("q");
            w.commit(b"{}", Some(&dest)).unwrap();
            let m = MessageFile::open(&dest).unwrap();
            m.verify().unwrap();
            let stored = m.read_all().unwrap();
            let want: Vec<u8> = if dot_ends {
                want.clone()
            } else {
                let mut n = Normalizer::new(false);
                let mut out = Vec::new();
                n.feed(&input, true, &mut out);
                out
            };
            assert!(stored == want, "dot_ends {dot_ends}");
            assert_eq!(size, want.len() as u64);
            assert_eq!(lines, count_lf(&want));
            assert_eq!(ml, m.max_line());
        }
    }

    #[test]
    fn direct_write_error_is_reported_with_path() {
        let t = TempDir::new();
        let inp = Input::file(t.path(), &b"0123456789\n".repeat(300_000));
        let Some((mut w, tmp)) = stream_into_full_disk(&t, &inp) else {
            return;
        };
        assert!(matches!(w.stream_rest(), Err(CoreError::Usage(_))));
        w.abort().unwrap();
        assert!(!tmp.exists());
    }

    /// Whether another open file description of `path` can take the lock now.
    fn lockable(path: &Path) -> bool {
        let f = io::open_read(path).unwrap();
        match io::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => false,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn locked_until_rename_commit() {
        let t = TempDir::new();
        let inp = Input::pipe(b"x\n");
        let tmp = t.path().join("tmp");
        let dest = t.path().join("dest");
        let mut w = SpoolWriter::create(&tmp, inp.fd(), true).unwrap();
        assert!(!lockable(&tmp));
        retry(|| w.stream_rest()).unwrap();
        assert!(!lockable(&tmp));
        w.commit(b"{}", Some(&dest)).unwrap();
        assert!(lockable(&dest));
        assert!(!tmp.exists());
    }

    #[test]
    fn commit_in_place() {
        let t = TempDir::new();
        let inp = Input::pipe(b"Subject: a\r\n\r\nbody\r\n");
        let path = t.path().join("final");
        let mut w = SpoolWriter::create(&path, inp.fd(), true).unwrap();
        assert!(!lockable(&path));
        retry(|| w.stream_rest()).unwrap();
        assert!(matches!(w.commit(b"", None), Ok(())));
        assert!(lockable(&path));
        let m = MessageFile::open(&path).unwrap();
        m.verify().unwrap();
        assert_eq!(m.read_all().unwrap(), b"Subject: a\n\nbody\n");
        // committed: abort and drop keep the file
        w.abort().unwrap();
        drop(w);
        assert!(path.exists());
        assert!(matches!(
            SpoolWriter::create(&path, inp.fd(), true),
            Err(CoreError::Io { .. })
        ));
    }

    #[test]
    fn commit_in_place_error_removes_file() {
        let Ok(full) = File::options().write(true).open("/dev/full") else {
            return;
        };
        let t = TempDir::new();
        let inp = Input::pipe(b"small\n");
        let path = t.path().join("final");
        let mut w = SpoolWriter::create(&path, inp.fd(), true).unwrap();
        retry(|| w.stream_rest()).unwrap();
        // The data is still buffered; the footer write goes to /dev/full.
        let locked = w.file.replace(full);
        let e = w.commit(b"{}", None).unwrap_err();
        assert_eq!(e.raw_errno(), Some(libc::ENOSPC));
        assert!(!path.exists());
        assert!(matches!(w.stream_rest(), Err(CoreError::Usage(_))));
        w.abort().unwrap();
        drop(locked);
    }

    #[test]
    fn abort_removes_before_unlocking_and_fork_keeps_lock() {
        let t = TempDir::new();
        let inp = Input::pipe(b"x");
        let tmp = t.path().join("tmp");
        let mut w = SpoolWriter::create(&tmp, inp.fd(), true).unwrap();
        // A forked child that drops its copy of the writer and exits neither removes the file
        // nor releases the parent's lock.
        // SAFETY: the child only drops the writer (close(2) and freeing memory; no unlink, it
        // is not the creator) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            drop(w);
            // SAFETY: leave the child without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(status, 0);
        assert!(tmp.exists());
        assert!(!lockable(&tmp));
        let keep = io::open_read(&tmp).unwrap();
        w.abort().unwrap();
        assert!(!tmp.exists());
        io::flock(keep.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB).unwrap();
    }

    #[test]
    fn bad_input_fd() {
        let t = TempDir::new();
        let tmp = t.path().join("tmp");
        // a descriptor number that is not open
        let mut w = SpoolWriter::create(&tmp, 1_000_000, true).unwrap();
        let e = w.read_head(10).unwrap_err();
        assert_eq!(e.raw_errno(), Some(libc::EBADF));
        assert!(SpoolWriter::create(&t.path().join("y"), -1, true).is_err());
    }
}
