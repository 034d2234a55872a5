//! `dma._core`: the spool bytes of dma.
//!
//! All logic lives in plain Rust modules that know nothing of Python (and are tested by
//! `cargo test`); `bindings` wraps them thinly. This file declares the module and is the one
//! place where core errors become Python exceptions.

pub mod bindings;
pub mod error;
pub mod footer;
pub mod io;
pub mod reader;
pub mod transform;
pub mod writer;

use error::{errno_of, strerror, CoreError};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

pyo3::import_exception!(dma.errors, SpoolCorrupt);

/// The error mapping:
/// - `Io` -> `OSError(errno, strerror[, filename])`. `OSError` itself picks the subclass
///   (`FileNotFoundError`, `FileExistsError`, `BrokenPipeError`, ...) from the errno, and
///   sets `errno`, `strerror` and `filename`; ENOSPC stays errno 28.
/// - `Corrupt` -> `dma.errors.SpoolCorrupt("<path>: <what is wrong>")`.
/// - `Usage` -> `ValueError`.
impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        match e {
            CoreError::Io { source, path } => {
                let errno = errno_of(&source);
                let msg = strerror(errno);
                match path {
                    Some(p) => PyOSError::new_err((errno, msg, p.into_os_string())),
                    None => PyOSError::new_err((errno, msg)),
                }
            }
            corrupt @ CoreError::Corrupt { .. } => SpoolCorrupt::new_err(corrupt.to_string()),
            CoreError::Usage(msg) => PyValueError::new_err(msg),
        }
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<bindings::SpoolWriter>()?;
    m.add_class::<bindings::MessageFile>()?;
    m.add_class::<bindings::Cursor>()?;
    m.add_function(wrap_pyfunction!(bindings::transform, m)?)?;
    m.add("FOOTER_LEN", footer::FOOTER_LEN)?;
    Ok(())
}
