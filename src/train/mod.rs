//! The trainer behind `cargo run --bin train`: the user's [`settings`]
//! resolve into a run ([`spec`]: what trains, where each value came from,
//! and this process's place among the ranks); [`fit`] checks it against its
//! memory budget before anything is loaded; a [`trainer::Trainer`] builds
//! the model ([`model`]), reads the data ([`data`], [`tokenizer`], [`chat`])
//! and trains with AdamW ([`optim`]), writing checkpoints ([`checkpoint`]),
//! metrics and the loss plot ([`plot`]). Over several processes the ranks
//! share gradients through a [`collective`] ([`sync`]). A trained run is
//! used by [`generate`] (text, through the KV-cached inference path) and
//! [`evaluate`] (held-out loss of the base and of base + adapter), and
//! [`merge`] merges its adapter into its base.

pub mod chat;
pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod device;
pub mod evaluate;
pub mod fit;
pub mod generate;
pub mod merge;
pub mod model;
pub mod optim;
pub mod plot;
pub mod settings;
pub mod spec;
pub mod sync;
pub mod tokenizer;
pub mod trainer;
