//! Step and build logs at scale: the operator's limits, turning raw output into masked and capped lines, storing
//! them compactly and quickly, and the views people read them through.

pub mod chunk;
pub mod limits;
pub mod lines;
pub mod recorder;
pub mod retention;
pub mod view;

pub use limits::LogLimits;
pub use lines::LINE_CONTINUES;
pub use recorder::{pipe, recorder, EventTx};
