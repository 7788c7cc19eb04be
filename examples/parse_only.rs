//! The floor for `replay`: read the same JSON Lines and only parse them with serde_json.
//!
//!     cargo run --release --example parse_only -- events.jsonl [value|ignored]
//!
//! `value` builds a `serde_json::Value` per line (a plain parse); `ignored` only validates
//! (`IgnoredAny`, the least work serde_json can do).

use std::io::BufRead;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: parse_only FILE [value|ignored]"))?;
    let mode = args.next().unwrap_or_else(|| "value".into());
    let started = Instant::now();
    let mut r = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path)?);
    let (mut lines, mut bytes) = (0u64, 0u64);
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        let n = r.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        lines += 1;
        if mode == "ignored" {
            let _: serde::de::IgnoredAny = serde_json::from_slice(&buf)?;
        } else {
            let v: serde_json::Value = serde_json::from_slice(&buf)?;
            std::hint::black_box(v);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "parsed {lines} lines ({mode}) in {secs:.2} s: {:.0} lines/s, {:.1} MB/s",
        lines as f64 / secs,
        bytes as f64 / 1e6 / secs
    );
    Ok(())
}
