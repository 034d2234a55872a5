//! Thin Python wrappers over the core types. No logic here beyond argument conversion,
//! releasing the GIL around I/O, and running Python signal handlers when a blocking read or
//! write is interrupted (so Ctrl-C reaches a `sendmail` waiting on its input).

use crate::error::Result;
use crate::reader::{self, Pump};
use crate::transform::{transform_all, Kind};
use crate::writer;
use pyo3::prelude::*;
use pyo3::types::{PyAny, PyBytes};
use std::ffi::OsStr;
use std::os::unix::io::RawFd;
use std::path::PathBuf;

/// Run `f` without the GIL. On EINTR, take the GIL back, run signal handlers (which may
/// raise, e.g. KeyboardInterrupt), then resume `f`, which keeps its state across the retry.
fn detached<T, F>(py: Python<'_>, mut f: F) -> PyResult<T>
where
    F: FnMut() -> Result<T> + Send,
    T: Send,
{
    loop {
        match py.detach(&mut f) {
            Err(e) if e.is_interrupted() => py.check_signals()?,
            r => return Ok(r?),
        }
    }
}

/// Writes one submitted message into a new spool file; see docs/internals.md.
#[pyclass(module = "dma._core")]
pub struct SpoolWriter {
    inner: writer::SpoolWriter,
}

#[pymethods]
impl SpoolWriter {
    #[new]
    #[pyo3(signature = (path, fd, dot_ends = true))]
    fn new(py: Python<'_>, path: PathBuf, fd: RawFd, dot_ends: bool) -> PyResult<Self> {
        let inner = py.detach(|| writer::SpoolWriter::create(&path, fd, dot_ends))?;
        Ok(SpoolWriter { inner })
    }

    /// The temporary file.
    #[getter]
    fn path(&self) -> &OsStr {
        self.inner.path().as_os_str()
    }

    /// Bytes written to the message part so far.
    #[getter]
    fn size(&self) -> u64 {
        self.inner.size()
    }

    /// Whether a byte >= 0x80 has been written.
    #[getter]
    fn eight_bit(&self) -> bool {
        self.inner.eight_bit()
    }

    /// Longest line written so far, in bytes without its LF.
    #[getter]
    fn max_line(&self) -> u64 {
        self.inner.max_line()
    }

    /// LF bytes in the stored message part; complete once `stream_rest()` has returned.
    #[getter]
    fn lines(&self) -> u64 {
        self.inner.lines()
    }

    #[pyo3(signature = (limit = 1048576))]
    fn read_head<'py>(&mut self, py: Python<'py>, limit: usize) -> PyResult<Bound<'py, PyBytes>> {
        let inner = &mut self.inner;
        let head = detached(py, || inner.read_head(limit))?;
        Ok(PyBytes::new(py, &head))
    }

    fn write_head(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let inner = &mut self.inner;
        detached(py, || inner.write_head(data))
    }

    fn stream_rest(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        detached(py, || inner.stream_rest())
    }

    /// With `dest`: rename there (no replace). Without: commit in place at `path`.
    #[pyo3(signature = (envelope, dest = None))]
    fn commit(&mut self, py: Python<'_>, envelope: &[u8], dest: Option<PathBuf>) -> PyResult<()> {
        let inner = &mut self.inner;
        detached(py, || inner.commit(envelope, dest.as_deref()))
    }

    fn abort(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        detached(py, || inner.abort())
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// Leaving the block aborts unless `commit` succeeded.
    fn __exit__(
        &mut self,
        py: Python<'_>,
        exc_type: &Bound<'_, PyAny>,
        exc_value: &Bound<'_, PyAny>,
        traceback: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let _ = (exc_type, exc_value, traceback);
        self.abort(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "<SpoolWriter {:?} size={}>",
            self.inner.path(),
            self.inner.size()
        )
    }
}

fn parse_kind(kind: &str) -> Result<Kind> {
    Kind::parse(kind)
}

/// One committed spool message, read with positional reads only.
#[pyclass(module = "dma._core", frozen)]
pub struct MessageFile {
    inner: reader::MessageFile,
}

#[pymethods]
impl MessageFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| reader::MessageFile::open(&path))?;
        Ok(MessageFile { inner })
    }

    #[getter]
    fn path(&self) -> &OsStr {
        self.inner.path().as_os_str()
    }

    /// Length of the message part in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.inner.size()
    }

    #[getter]
    fn eight_bit(&self) -> bool {
        self.inner.eight_bit()
    }

    #[getter]
    fn max_line(&self) -> u64 {
        self.inner.max_line()
    }

    #[getter]
    fn crc32(&self) -> u32 {
        self.inner.crc32()
    }

    /// True after `close()`.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn envelope<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.envelope())
    }

    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        Ok(py.detach(|| inner.verify())?)
    }

    fn fileno(&self) -> PyResult<RawFd> {
        Ok(self.inner.fileno()?)
    }

    #[pyo3(signature = (limit = 1048576))]
    fn read_head<'py>(&self, py: Python<'py>, limit: usize) -> PyResult<Bound<'py, PyBytes>> {
        let inner = &self.inner;
        let head = py.detach(|| inner.read_head(limit))?;
        Ok(PyBytes::new(py, &head))
    }

    #[pyo3(signature = (kind = "raw", offset = 0, chunk = 1048576))]
    fn cursor(&self, py: Python<'_>, kind: &str, offset: u64, chunk: usize) -> PyResult<Cursor> {
        let kind = parse_kind(kind)?;
        let inner = &self.inner;
        let cursor = py.detach(|| inner.cursor(kind, offset, chunk))?;
        Ok(Cursor {
            inner: cursor,
            buf: Vec::new(),
        })
    }

    #[pyo3(signature = (fd, kind = "smtp", chunk = 1048576))]
    fn send_to(&self, py: Python<'_>, fd: RawFd, kind: &str, chunk: usize) -> PyResult<u64> {
        let kind = parse_kind(kind)?;
        let mut pump = Pump::new(self.inner.cursor(kind, 0, chunk)?, fd)?;
        detached(py, || pump.run())
    }

    #[pyo3(signature = (fd, kind = "mbox", fsync = true))]
    fn append_to(&self, py: Python<'_>, fd: RawFd, kind: &str, fsync: bool) -> PyResult<u64> {
        let kind = parse_kind(kind)?;
        let mut pump = Pump::new(self.inner.cursor(kind, 0, reader::DEFAULT_CHUNK)?, fd)?;
        let n = detached(py, || pump.run())?;
        if fsync {
            py.detach(|| reader::sync_fd(fd))?;
        }
        Ok(n)
    }

    /// Closing the last descriptor of an unlinked file frees its blocks, which can wait on
    /// the file system's journal: the GIL is released meanwhile.
    fn close(&self, py: Python<'_>) {
        let inner = &self.inner;
        py.detach(|| inner.close());
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __exit__(
        &self,
        exc_type: &Bound<'_, PyAny>,
        exc_value: &Bound<'_, PyAny>,
        traceback: &Bound<'_, PyAny>,
    ) -> bool {
        let _ = (exc_type, exc_value, traceback);
        let inner = &self.inner;
        exc_type.py().detach(|| inner.close());
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "<MessageFile {:?} size={}{}>",
            self.inner.path(),
            self.inner.size(),
            if self.inner.is_closed() {
                " closed"
            } else {
                ""
            }
        )
    }
}

/// An iterator of transformed chunks with its own offset.
#[pyclass(module = "dma._core")]
pub struct Cursor {
    inner: reader::Cursor,
    buf: Vec<u8>,
}

#[pymethods]
impl Cursor {
    /// The source offset whose transformed bytes have all been returned.
    #[getter]
    fn offset(&self) -> u64 {
        self.inner.offset()
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let Cursor { inner, buf } = self;
        buf.clear();
        let more = py.detach(|| inner.next_into(buf))?;
        if !more {
            *buf = Vec::new();
            return Ok(None);
        }
        let chunk = PyBytes::new(py, buf);
        if buf.capacity() > 4 * reader::MAX_CHUNK {
            *buf = Vec::new();
        }
        Ok(Some(chunk))
    }
}

/// Transform a whole buffer (for tests and small data; messages use cursors).
#[pyfunction]
pub fn transform<'py>(py: Python<'py>, data: &[u8], kind: &str) -> PyResult<Bound<'py, PyBytes>> {
    let kind = parse_kind(kind)?;
    let out = py.detach(|| transform_all(kind, data));
    Ok(PyBytes::new(py, &out))
}
