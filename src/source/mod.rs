//! Reading the Qoder API: wire types, their conversion to the domain model, the HTTP client and
//! the poller.

pub mod client;
pub mod convert;
pub mod poller;
pub mod wire;
