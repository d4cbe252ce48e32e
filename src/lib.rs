//! `runner`: runs OpsChain-style changes, building a fresh image and a discarded container for every step.
//!
//! The library holds everything; `src/main.rs` only parses flags and hands over to [`cli`].

pub mod actions;
pub mod app;
pub mod buildkit;
pub mod cache;
pub mod cli;
pub mod context;
pub mod daemon;
pub mod data_dir;
pub mod drill;
pub mod error;
pub mod events;
pub mod executor;
pub mod grpc;
pub mod image;
pub mod logs;
pub mod mask;
pub mod orchestrator;
pub mod policy;
pub mod properties;
pub mod runtime;
pub mod secrets;
pub mod snapshot;
pub mod store;
pub mod web;
