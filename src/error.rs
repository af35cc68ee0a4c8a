//! One error type for the whole crate.

use std::fmt;

/// Everything that can go wrong in kiln. Each variant carries a message a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Shapes that do not fit the op's contract; the message names the shapes.
    Shape(String),
    /// A dtype the op does not take, or two tensors whose dtypes must agree and do not.
    DType(String),
    /// Tensors on different devices handed to one op.
    DeviceMismatch(String),
    /// A device index that does not exist, or a backend that is not available here.
    NoDevice(String),
    /// The op or the dtype combination has no kernel on this backend (never a silent CPU fallback).
    Unsupported(String),
    /// A device allocation failed.
    OutOfMemory(String),
    /// A kernel failed to compile; `log` is the compiler's own output.
    Compile { kernel: String, target: String, log: String },
    /// The CUDA driver or NVRTC returned an error.
    Cuda(String),
    /// wgpu reported an error.
    Wgpu(String),
    /// Bad argument that is not a shape or dtype problem (a NaN where forbidden, a bad length).
    InvalidArgument(String),
    /// A file could not be read or written.
    Io(String),
}

/// `Result` with kiln's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape(m) => write!(f, "shape error: {m}"),
            Error::DType(m) => write!(f, "dtype error: {m}"),
            Error::DeviceMismatch(m) => write!(f, "device mismatch: {m}"),
            Error::NoDevice(m) => write!(f, "no such device: {m}"),
            Error::Unsupported(m) => write!(f, "unsupported: {m}"),
            Error::OutOfMemory(m) => write!(f, "out of device memory: {m}"),
            Error::Compile { kernel, target, log } => {
                write!(f, "compiling {kernel} for {target} failed:\n{log}")
            }
            Error::Cuda(m) => write!(f, "CUDA error: {m}"),
            Error::Wgpu(m) => write!(f, "wgpu error: {m}"),
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::Io(m) => write!(f, "I/O error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The same error with `context` (a file, a tensor) before its message; errors from the
    /// devices are left as they are.
    pub(crate) fn context(self, context: &str) -> Error {
        match self {
            Error::Shape(m) => Error::Shape(format!("{context}: {m}")),
            Error::DType(m) => Error::DType(format!("{context}: {m}")),
            Error::Unsupported(m) => Error::Unsupported(format!("{context}: {m}")),
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{context}: {m}")),
            Error::Io(m) => Error::Io(format!("{context}: {m}")),
            other => other,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}
