//! FUSE over io_uring (Linux 6.14+, `CONFIG_FUSE_IO_URING`): the kernel queues requests per CPU
//! on rings we register, and each answer is committed together with the fetch of the next
//! request, so no `read(2)`/`writev(2)` per request. docs/transport-uring.md says what works.

pub mod abi;
mod decode;
pub mod queue;
mod reply;
mod session;

pub use session::{available, start, UringError, UringSession, ENABLE_URING};
