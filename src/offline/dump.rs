//! `dump`: sessions' events from the API as JSON Lines.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::config::{DumpFlags, Settings};
use crate::sinks::metrics::Metrics;
use crate::source::client::{Client, ClientConfig, ListScope, TokenSource};
use crate::source::poller::meta_of;
use crate::source::wire::{self, ListCursor, Page};

use super::{AGENT_LINE, STREAM_FIELD, THREAD_LINE};
/// Lists every session the token can see, newest first (or the named ones).
async fn session_ids(client: &Client, settings: &Settings) -> anyhow::Result<Vec<String>> {
    if !settings.sessions.is_empty() {
        return Ok(settings.sessions.clone());
    }
    let mut ids = Vec::new();
    let mut cursor: Option<ListCursor> = None;
    let mut visited = std::collections::HashSet::new();
    loop {
        let body = client
            .list_sessions(cursor.as_ref(), ListScope::All)
            .await?;
        let page: Page<'_> = serde_json::from_slice(&body).context("listing sessions")?;
        let mut last = None;
        for raw in &page.data {
            if let Some(id) = wire::decode_session(raw.get()).and_then(|s| s.id) {
                last = Some(id.clone());
                if settings.shard.owns(&id) {
                    ids.push(id);
                }
            }
        }
        let Some(next) = page.next_list_cursor(last, cursor.as_ref()) else {
            break;
        };
        if !visited.insert(next.clone()) {
            anyhow::bail!("the session list pointed back to a page already read ({next:?})");
        }
        cursor = Some(next);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(ids)
}

fn write_line(out: &mut dyn Write, v: &Value) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, v)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Writes one stream's events as lines; returns the sub-agent threads it announced.
async fn dump_stream(
    client: &Client,
    id: &str,
    thread: Option<&str>,
    out: &mut dyn Write,
    events: &mut u64,
) -> anyhow::Result<Vec<String>> {
    let mut threads = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let body = match thread {
            None => client.list_events(id, cursor.as_deref()).await?,
            Some(t) => client.list_thread_events(id, t, cursor.as_deref()).await?,
        };
        let mut repaired = None;
        let (page, _) =
            wire::parse_page(&body, &mut repaired).with_context(|| format!("events of {id}"))?;
        let mut last = None;
        for raw in &page.data {
            let mut v: Value = serde_json::from_str(raw.get())?;
            if let Value::Object(m) = &mut v {
                m.entry("session_id").or_insert_with(|| Value::from(id));
                if let Some(t) = thread {
                    m.insert(STREAM_FIELD.into(), Value::from(t));
                }
                last = m.get("id").and_then(Value::as_str).map(str::to_owned);
                if thread.is_none()
                    && m.get("type").and_then(Value::as_str) == Some("session.thread_created")
                    && let Some(t) = m.get("session_thread_id").and_then(Value::as_str)
                    && !threads.iter().any(|x| x == t)
                {
                    threads.push(t.to_owned());
                }
            }
            write_line(out, &v)?;
            *events += 1;
        }
        let Some(next) = page.next_cursor(last, cursor.as_deref()) else {
            break;
        };
        cursor = Some(next);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(threads)
}

/// Writes agent `id`'s object as an agent line, when the API has one.
async fn dump_agent(client: &Client, id: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    match client.get_agent(id).await {
        Ok(body) => {
            let mut v: Map<String, Value> =
                serde_json::from_slice(&body).with_context(|| format!("agent {id}"))?;
            v.insert("type".into(), Value::from(AGENT_LINE));
            v.entry("id").or_insert_with(|| Value::from(id));
            write_line(out, &Value::Object(v))
        }
        Err(e) if e.status() == Some(404) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("agent {id}")),
    }
}

/// Writes session `id`'s thread list as thread lines; returns its sub-agent threads.
async fn dump_thread_list(
    client: &Client,
    id: &str,
    out: &mut dyn Write,
) -> anyhow::Result<Vec<String>> {
    let objects = match client.thread_objects(id).await {
        Ok(o) => o,
        Err(e) if e.status() == Some(404) => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("threads of {id}")),
    };
    let mut threads = Vec::new();
    for raw in objects {
        let mut v: Map<String, Value> = serde_json::from_str(raw.get())?;
        v.insert("type".into(), Value::from(THREAD_LINE));
        v.insert("session_id".into(), Value::from(id));
        let sub = v.get("parent_thread_id").is_some_and(|p| !p.is_null());
        if let Some(tid) = v.get("id").and_then(Value::as_str)
            && sub
        {
            threads.push(tid.to_owned());
        }
        write_line(out, &Value::Object(v))?;
    }
    Ok(threads)
}

/// Writes one session: its agent object when it names the agent by id alone, the session
/// object, a coordinator's thread list, the session's stream, then each sub-agent thread's
/// stream (its lines marked with the thread, so replay reads them as that stream). `false`:
/// the session is gone (404) and was skipped.
async fn dump_session(
    client: &Client,
    id: &str,
    out: &mut dyn Write,
    events: &mut u64,
    agents_written: &mut std::collections::HashSet<String>,
) -> anyhow::Result<bool> {
    let body = match client.get_session(id).await {
        Ok(b) => b,
        Err(e) if e.status() == Some(404) => {
            tracing::warn!(session = %id, "session not found; skipped");
            return Ok(false);
        }
        Err(e) => return Err(e).with_context(|| format!("session {id}")),
    };
    let mut obj: Map<String, Value> =
        serde_json::from_slice(&body).with_context(|| format!("session {id}"))?;
    obj.insert("type".into(), Value::from("session"));
    obj.entry("id").or_insert_with(|| Value::from(id));
    let session = wire::decode_session(&Value::Object(obj.clone()).to_string());
    let meta = session.as_ref().map(meta_of).unwrap_or_default();
    if meta.agent_name.is_none()
        && let Some(agent_id) = meta.agent_id.as_deref()
        && agents_written.insert(agent_id.to_owned())
    {
        dump_agent(client, agent_id, out).await?;
    }
    write_line(out, &Value::Object(obj))?;
    let mut threads = if meta.multiagent {
        dump_thread_list(client, id, out).await?
    } else {
        Vec::new()
    };
    for t in dump_stream(client, id, None, out, events).await? {
        if !threads.contains(&t) {
            threads.push(t);
        }
    }
    for tid in &threads {
        dump_stream(client, id, Some(tid), out, events).await?;
    }
    Ok(true)
}

/// Writes the sessions' events as JSON Lines.
pub async fn dump(settings: &Settings, flags: &DumpFlags) -> anyhow::Result<()> {
    let pat = settings.require_pat()?;
    let metrics = Metrics::new().context("metrics registry")?;
    let client = Client::new(
        ClientConfig::from_settings(settings),
        TokenSource::new(pat),
        metrics.process.clone(),
        CancellationToken::new(),
    )?;
    // To a temporary file beside --output, renamed over it only when the dump is whole: a
    // refused token or a failure half-way leaves no empty or partial file behind.
    // Not a regular file (`/dev/stdout`, a FIFO): written as it is, there is nothing to rename.
    let direct = flags
        .output
        .as_deref()
        .is_some_and(|p| std::fs::metadata(p).is_ok_and(|m| !m.is_file()));
    let mut tmp = match &flags.output {
        Some(_) if direct => None,
        Some(p) => {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            Some(
                tempfile::Builder::new()
                    .prefix(".qoder-dump-")
                    .tempfile_in(dir)
                    .with_context(|| format!("--output {}", p.display()))?,
            )
        }
        None => None,
    };
    let mut out: Box<dyn Write> = match (&mut tmp, &flags.output) {
        (Some(f), _) => Box::new(std::io::BufWriter::new(f.as_file_mut())),
        (None, Some(p)) => Box::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .with_context(|| format!("--output {}", p.display()))?,
        )),
        (None, None) => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let started = Instant::now();
    let ids = session_ids(&client, settings).await?;
    let (mut events, mut sessions) = (0u64, 0u64);
    let mut agents_written = std::collections::HashSet::new();
    // On a terminal: sessions done of all, events, rate and time left (hidden otherwise).
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} sessions, {msg} events, {per_sec}, eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for id in &ids {
        if dump_session(&client, id, &mut out, &mut events, &mut agents_written).await? {
            sessions += 1;
        }
        bar.inc(1);
        bar.set_message(events.to_string());
    }
    bar.finish_and_clear();
    out.flush()?;
    drop(out);
    if let (Some(tmp), Some(path)) = (tmp, &flags.output) {
        tmp.as_file().sync_all()?;
        tmp.persist(path)
            .with_context(|| format!("--output {}", path.display()))?;
    }
    tracing::info!(
        sessions,
        events,
        seconds = started.elapsed().as_secs_f64(),
        "dump complete"
    );
    Ok(())
}
