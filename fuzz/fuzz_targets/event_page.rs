//! Any bytes as an event page from the API: the page parser (with its repair of bad UTF-8 and
//! bare NaN), the event decoder and the turn state machine must not panic, and whatever they
//! count must be finite and within the per-field bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qoder_exporter::event::Event;
use qoder_exporter::pipeline::tracker::SessionState;
use qoder_exporter::sinks::metrics::{Delta, DurableMetrics, Family};
use qoder_exporter::source::wire;

fuzz_target!(|body: &[u8]| {
    let mut repaired = None;
    let Ok((page, _repairs)) = wire::parse_page(body, &mut repaired) else {
        return;
    };
    let mut state = SessionState::new("coder".into());
    let mut delta = Delta::default();
    let mut closed = Vec::new();
    for raw in &page.data {
        if let Ok(decoded) = wire::decode_event(raw.get()) {
            let event = Event::from_wire(decoded.event);
            state.apply("sess_fuzz", &event, &mut delta, &mut closed);
        }
    }
    let _ = page.next_cursor(None, None);
    let metrics = DurableMetrics::new();
    metrics.publish(metrics.stage(&delta));
    for family in Family::ALL {
        let total = metrics.total(family);
        assert!(total.is_finite() && total >= 0.0, "{family:?}: {total}");
    }
});
