//! Harness for end-to-end tests.

pub mod bao;
