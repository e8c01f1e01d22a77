//! The trainer behind `cargo run --bin train`: resolve the configuration
//! ([`config`]), build the model ([`model`]), read the data ([`data`],
//! [`tokenizer`]), train ([`run`]) with AdamW ([`optim`]) and checkpoints
//! ([`checkpoint`]), and plot the loss ([`plot`]). [`fit`] checks the run
//! against its memory budget before anything is loaded; over several
//! processes the ranks share gradients through a [`collective`].

pub mod chat;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod data;
pub mod fit;
pub mod model;
pub mod optim;
pub mod plot;
pub mod run;
pub mod tokenizer;
