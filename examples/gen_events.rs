//! Writes a simulated event log as JSON Lines (the `dump` format), for the replay benchmark:
//!
//!     cargo run --release --example gen_events -- SESSIONS MAX_TURNS > events.jsonl
//!
//! Same arguments, same bytes (the simulator is seeded).

use std::io::Write;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let sessions: usize = args.next().as_deref().unwrap_or("1000").parse()?;
    let max_turns: usize = args.next().as_deref().unwrap_or("20").parse()?;
    let (log, totals) = qoder_exporter::sim::generate(&qoder_exporter::sim::ScenarioConfig {
        seed: 1,
        sessions,
        max_turns,
        stagger: 0,
        hostile: false,
        sub_agents: true,
    });
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut agents_written = std::collections::HashSet::new();
    for s in &log {
        // An agent named by id alone: its object first, as `dump` writes it.
        if let Some(id) = s.object.get("agent_id").and_then(|v| v.as_str())
            && agents_written.insert(id.to_owned())
            && let Some(mut agent) = qoder_exporter::sim::agent_object(id)
        {
            agent["type"] = "agent".into();
            serde_json::to_writer(&mut out, &agent)?;
            out.write_all(b"\n")?;
        }
        let mut obj = s.object.clone();
        obj.insert("type".into(), "session".into());
        if let Some((_, usage)) = s.usage.last() {
            obj.insert("usage".into(), usage.clone());
        }
        serde_json::to_writer(&mut out, &obj)?;
        out.write_all(b"\n")?;
        for e in &s.events {
            let mut v: serde_json::Value = serde_json::from_str(&e.json)?;
            if let Some(m) = v.as_object_mut() {
                m.entry("session_id").or_insert_with(|| s.id.clone().into());
            }
            serde_json::to_writer(&mut out, &v)?;
            out.write_all(b"\n")?;
        }
        // Sub-agent threads' streams, marked as `dump` marks them.
        for t in &s.threads {
            for e in &t.events {
                let mut v: serde_json::Value = serde_json::from_str(&e.json)?;
                if let Some(m) = v.as_object_mut() {
                    m.entry("session_id").or_insert_with(|| s.id.clone().into());
                    m.insert("qoder_exporter_stream".into(), t.id.clone().into());
                }
                serde_json::to_writer(&mut out, &v)?;
                out.write_all(b"\n")?;
            }
        }
    }
    out.flush()?;
    eprintln!("{} events in {} sessions", totals.event_count(), log.len());
    Ok(())
}
