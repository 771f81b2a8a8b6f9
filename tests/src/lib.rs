//! Cross-crate integration tests for Outboard (see `tests/tests/`).
#![deny(missing_docs)]
