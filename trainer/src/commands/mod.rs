//! Subcommands, one file each.

pub mod calibrate;
pub mod embed;
pub mod eval;
pub mod export;
pub mod fit_transform;
pub mod import;
pub mod init;
pub mod replay;
pub mod splits;
pub mod synth;
pub mod train;
