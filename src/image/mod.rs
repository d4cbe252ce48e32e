//! Runner images: the offline base runner image and the per-step image built from a change's commit.

pub mod base;
pub mod step;
