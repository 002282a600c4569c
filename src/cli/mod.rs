//! The subcommands with more than a few lines of their own: training, and the commands that
//! read a checkpoint.

pub mod inspect;
pub mod train;
