//! Harness for end-to-end tests.

pub mod bao;
pub mod bao_auth;
pub mod bao_cluster;
pub mod cli;
pub mod fuse;
pub mod ports;
pub mod pykmip;
pub mod s3;
