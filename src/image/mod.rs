//! Runner images: the offline base runner image, the per-step image built from a change's commit, service
//! images built from the repository, and the offline Docker-in-Docker image.

pub mod agent;
pub mod base;
pub mod dind;
pub mod layered;
pub mod rootfs;
pub mod step;
