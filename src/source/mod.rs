//! Reading the Qoder API: wire types, the HTTP client and the poller.

pub mod client;
pub mod poller;
pub mod wire;
