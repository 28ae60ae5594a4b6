//! The C ABI (include/qbm.h is generated from this module by cbindgen).
//!
//! Conventions: every fallible call returns 0 or a negative errno and leaves a
//! thread-local message for `qbm_last_error()`; every pointer may be NULL;
//! outputs are written only on success; no panic crosses the boundary.

#![allow(non_camel_case_types)]

mod api;
mod guard;
mod types;

pub use api::*;
pub use types::*;
