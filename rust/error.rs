//! The one error type of the core. It carries no Python types; `lib.rs` maps it to Python
//! exceptions in exactly one place.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Every failure the core can report.
#[derive(Debug)]
pub enum CoreError {
    /// A system call failed. `path` names the file involved, when there is one (a socket or a
    /// pipe given as a bare descriptor has none).
    Io {
        source: io::Error,
        path: Option<PathBuf>,
    },
    /// A spool file failed an integrity check.
    Corrupt { path: PathBuf, reason: String },
    /// The caller used the API wrongly (bad argument, wrong order of calls, closed object).
    Usage(String),
}

pub type Result<T> = std::result::Result<T, CoreError>;

impl CoreError {
    pub fn io(source: io::Error, path: &Path) -> Self {
        CoreError::Io {
            source,
            path: Some(path.to_path_buf()),
        }
    }

    pub fn io_nopath(source: io::Error) -> Self {
        CoreError::Io { source, path: None }
    }

    pub fn errno(errno: i32, path: &Path) -> Self {
        Self::io(io::Error::from_raw_os_error(errno), path)
    }

    pub fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        CoreError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub fn usage(msg: impl Into<String>) -> Self {
        CoreError::Usage(msg.into())
    }

    /// The errno of an `Io` error (EIO for an I/O error that carries none).
    pub fn raw_errno(&self) -> Option<i32> {
        match self {
            CoreError::Io { source, .. } => Some(errno_of(source)),
            _ => None,
        }
    }

    /// True for an `Io` error that is EINTR: a signal arrived while the core was blocked. The
    /// operation can be called again and resumes where it stopped.
    pub fn is_interrupted(&self) -> bool {
        self.raw_errno() == Some(libc::EINTR)
    }
}

/// The errno of an `io::Error`. Errors that std makes up without one (short reads/writes)
/// become EIO, so Python always gets a real errno.
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The C library's message for `errno` ("No space left on device"), without the
/// " (os error N)" suffix that std's Display adds.
pub fn strerror(errno: i32) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; the XSI strerror_r (the one the libc crate
    // binds on Linux) NUL-terminates on success.
    let rc = unsafe { libc::strerror_r(errno, buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        format!("Unknown error {errno}")
    }
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::Io { source, path } => {
                let errno = errno_of(source);
                match path {
                    Some(p) => write!(
                        f,
                        "[Errno {errno}] {}: {:?}",
                        strerror(errno),
                        p.as_os_str()
                    ),
                    None => write!(f, "[Errno {errno}] {}", strerror(errno)),
                }
            }
            CoreError::Corrupt { path, reason } => {
                write!(f, "{}: {reason}", path.display())
            }
            CoreError::Usage(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for CoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_matches_libc() {
        assert_eq!(strerror(libc::ENOSPC), "No space left on device");
        assert_eq!(strerror(libc::ENOENT), "No such file or directory");
    }

    #[test]
    fn display_names_path() {
        let e = CoreError::errno(libc::ENOSPC, Path::new("/spool/tmp/x"));
        assert_eq!(e.raw_errno(), Some(28));
        assert_eq!(
            e.to_string(),
            "[Errno 28] No space left on device: \"/spool/tmp/x\""
        );
        let c = CoreError::corrupt(Path::new("/q/A"), "bad magic");
        assert_eq!(c.to_string(), "/q/A: bad magic");
    }

    #[test]
    fn made_up_io_errors_get_eio() {
        let e = CoreError::io_nopath(io::Error::new(io::ErrorKind::WriteZero, "zero"));
        assert_eq!(e.raw_errno(), Some(libc::EIO));
    }
}
