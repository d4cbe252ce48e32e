//! The properties engine: RFC 6902 parse/apply/diff, the layered merge that builds a step's view, validation of
//! the `opschain` section, and conflict detection between parallel steps. Pure: no I/O anywhere below here.

mod conflict;
mod merge;
mod opschain;
mod patch;
mod rules;

pub use conflict::{detect_conflict, touched_paths, Conflict};
pub use merge::{deep_merge, layered_view, Layers};
pub use opschain::{
    env_vars, files, named_secrets, secret_names, validate_opschain, FileFormat, OpschainError,
    PropertyFile, SecretKind,
};
pub use patch::{apply_patch, diff, parse_document, parse_patch, DocumentError, PatchError};
pub use rules::{excerpt, step_may_write, validate_document, DocumentRuleError, ADMIN_ONLY_KEYS};

/// The largest properties document (serialised JSON) the store accepts, whoever writes it: the CLI, the API or a
/// step's patch. Every step receives the documents, and the API sends them whole.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// An RFC 6902 JSON Patch.
pub type Patch = json_patch::Patch;
