//! Integration tests: the real app (in-process) and the real binary against the simulated
//! Qoder API on 127.0.0.1:0. One test binary, one module per concern.

mod binary;
mod common;
mod e2e;
mod ops;
mod otlp;
mod props;
mod sdk;
mod traces;
mod web;
