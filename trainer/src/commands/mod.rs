//! Subcommands, one file each.

pub mod embed;
pub mod import;
