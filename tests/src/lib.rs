//! Shared helpers for corebuf's cross-crate integration tests (the tests live in `tests/`).
