//! Any bytes as a session object (list item or `GET /sessions/{id}`): decoding must not panic,
//! and the usage it yields must be finite.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qoder_exporter::source::wire;

fuzz_target!(|body: &[u8]| {
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    if let Some(session) = wire::decode_session(text) {
        let _ = format!("{session:?}");
    }
    if let Ok(thread) = serde_json::from_str::<wire::WireThread>(text) {
        let _ = thread.agent_name();
    }
});
