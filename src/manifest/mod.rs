//! Job-attachments manifests: one model for every format, decoders, validation and canonical
//! encoders that reproduce the Deadline Cloud Python client byte for byte.

mod model;

pub use model::{Content, EntryKind, EntryRef, FileEntry, Format, Hash, CHUNK_SIZE};
