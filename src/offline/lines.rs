//! Replay's input, read and decoded in parallel, handed back in file order.
//!
//! Decoding the JSON of each line is most of a replay's work, while the pipeline thread (turns,
//! deltas, commits) needs a fraction of a core. So one thread reads the files into chunks of
//! lines, a few workers decode the chunks (each line into a [`Line`], with the domain event
//! built, and a stream's consecutive event lines into one run), and the caller gets the chunks
//! back in the order they were read, to route them to the pipeline exactly as a single thread
//! would. Memory stays bounded: a few chunks per worker are in flight (whatever one slow chunk
//! does), and their buffers go round (fresh memory costs the kernel's page zeroing, which had
//! been a fifth of a replay's cycles).

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};

use anyhow::Context;

use super::{AGENT_LINE, THREAD_LINE};
use crate::event::{DroppedFields, Event};
use crate::pipeline::Item;
use crate::source::convert::TurnIds;
use crate::source::wire::{self, Str, WireAgentObject, WireEvent, WireSession, WireThread};

/// Longest line accepted (a hostile file must not exhaust memory).
const MAX_LINE: usize = 16 * 1024 * 1024;
/// A chunk ends after this many lines or bytes: big enough that hand-offs between threads are
/// rare, small enough that the chunks in flight stay in cache.
const CHUNK_LINES: usize = 1024;
const CHUNK_BYTES: usize = 512 * 1024;
/// Bytes asked of an input at a time.
const BLOCK: usize = 64 * 1024;
/// Chunks read and not yet handed on, per worker.
const QUEUED_PER_WORKER: usize = 4;

/// One line of a replay input, decoded, or a run of event lines.
#[derive(Debug)]
pub(super) enum Line {
    /// Empty, or only white space.
    Blank,
    /// Longer than [`MAX_LINE`]: skipped unread.
    TooLarge,
    /// Not an event, nor a line `dump` writes (the reason, as `events_invalid_total` labels it).
    Invalid(&'static str),
    /// An agent object (`None`: it does not read as one).
    Agent(Option<WireAgentObject>),
    /// A thread object of a session's thread list, and the session it names. (Boxed, as a
    /// session: rare lines, and every line would otherwise be as large as they are.)
    Thread {
        thread: Option<Box<WireThread>>,
        session: Option<String>,
    },
    /// A session object (`None`: it does not read as one).
    Session(Option<Box<WireSession>>),
    /// Consecutive event lines of one stream.
    Events(EventRun),
}

impl Line {
    /// The lines of the input this stands for.
    pub(super) fn lines(&self) -> u64 {
        match self {
            Line::Events(run) => run.items.len() as u64,
            _ => 1,
        }
    }
}

/// Consecutive event lines of one session's stream, or of one of its threads' (a `dump` writes
/// each stream's events together): they go to the pipeline as one vector, built here on a
/// decoder, not moved one by one on the thread that routes them.
#[derive(Debug)]
pub(super) struct EventRun {
    /// The session the lines name.
    pub session: SessionName,
    /// A sub-agent thread's stream (`qoder_exporter_stream`); `None`: the session's.
    pub stream: Option<String>,
    /// One per line, as the pipeline takes them ([`Item::event`]: ids digested here).
    pub items: Vec<Item>,
    pub bad_fields: DroppedFields,
}

/// One line decoded on its own: an event, or any other line.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "nearly every line is an event, and it moves once, into its run"
)]
pub(super) enum Decoded {
    Event {
        session: SessionName,
        stream: Option<String>,
        item: Item,
        bad_fields: DroppedFields,
    },
    Other(Line),
}

/// The session an event line names.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SessionName {
    /// None (or an empty id).
    Missing,
    /// The one the chunk's previous event line named (lines of a session come together: an
    /// id copied once per run, not once per event).
    Same,
    Named(String),
}

/// Decodes one line (a worker's job; pure). `previous`: the session the chunk's previous event
/// line named.
pub(super) fn decode_line<'a>(
    raw: &'a str,
    previous: Option<&str>,
    turns: &mut TurnIds,
    wire: &mut WireEvent<'a>,
) -> Decoded {
    let raw = raw.trim();
    if raw.is_empty() {
        return Decoded::Other(Line::Blank);
    }
    let bad_fields = match wire::decode_event_into(raw, wire) {
        Ok(bad) => bad,
        Err(reason) => return Decoded::Other(Line::Invalid(reason.as_label())),
    };
    match wire.kind.as_deref() {
        Some(AGENT_LINE) => Decoded::Other(Line::Agent(serde_json::from_str(raw).ok())),
        Some(THREAD_LINE) => Decoded::Other(Line::Thread {
            thread: serde_json::from_str(raw).ok(),
            session: wire.session_id.take().map(Str::into_owned),
        }),
        Some("session") => Decoded::Other(Line::Session(wire::decode_session(raw).map(Box::new))),
        _ => {
            let session = match wire.session_id.take() {
                None => SessionName::Missing,
                Some(s) if s.is_empty() => SessionName::Missing,
                Some(s) if previous == Some(s.as_str()) => SessionName::Same,
                Some(s) => SessionName::Named(s.into_owned()),
            };
            let stream = wire.dump_stream.take().map(Str::into_owned);
            Decoded::Event {
                session,
                stream,
                item: Item::event(Event::from_wire_with(wire, turns)),
                bad_fields,
            }
        }
    }
}

/// Lines as read: one buffer, and where each line is in it (`None`: too large, skipped).
struct RawChunk {
    seq: u64,
    place: Place,
    text: Vec<u8>,
    lines: Vec<Option<Range<usize>>>,
}

/// Where a chunk was read: the file (an index into the inputs), its first line (from 1), and
/// the bytes read for it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Place {
    pub file: usize,
    pub first_line: u64,
    pub bytes: u64,
}

/// Consecutive lines of one input, decoded.
#[derive(Debug)]
pub(super) struct Chunk {
    pub place: Place,
    /// Taken by the caller (drained): the emptied vector goes back to the workers.
    pub lines: Vec<Line>,
}

/// Buffers that go round instead of being freed and allocated again.
struct Pool<T>(Mutex<Vec<T>>);

impl<T> Pool<T> {
    fn take(&self) -> Option<T> {
        self.0.lock().ok().and_then(|mut v| v.pop())
    }

    fn put(&self, item: T) {
        if let Ok(mut v) = self.0.lock() {
            v.push(item);
        }
    }
}

/// A chunk's read buffers: its text, and where each line is in it.
type ReadBuffers = (Vec<u8>, Vec<Option<Range<usize>>>);

/// What goes round: read buffers and decoded-line vectors.
struct Pools {
    raw: Pool<ReadBuffers>,
    lines: Pool<Vec<Line>>,
}

fn decode_chunk(mut raw: RawChunk, pools: &Pools) -> (u64, Chunk) {
    let mut lines = pools
        .lines
        .take()
        .unwrap_or_else(|| Vec::with_capacity(CHUNK_LINES));
    // The session of the previous event line, to send an id once per run of its lines.
    let mut previous: Option<String> = None;
    let mut turns = TurnIds::default();
    // Every line of the chunk is decoded into this one (see `wire::decode_event_into`).
    let mut wire = WireEvent::default();
    let count = raw.lines.len();
    for (i, range) in raw.lines.drain(..).enumerate() {
        let decoded = match range {
            None => Decoded::Other(Line::TooLarge),
            Some(r) => match std::str::from_utf8(&raw.text[r.clone()]) {
                Ok(line) => decode_line(line, previous.as_deref(), &mut turns, &mut wire),
                // A byte that is not UTF-8 costs the string it sits in, not the line.
                Err(_) => decode_line(
                    &String::from_utf8_lossy(&raw.text[r]),
                    previous.as_deref(),
                    &mut turns,
                    &mut WireEvent::default(),
                ),
            },
        };
        let (session, stream, item, bad_fields) = match decoded {
            Decoded::Event {
                session,
                stream,
                item,
                bad_fields,
            } => (session, stream, item, bad_fields),
            Decoded::Other(line) => {
                end_run(&mut lines);
                lines.push(line);
                continue;
            }
        };
        // The line goes on the run before it when that is the line just before, of the
        // same session and stream.
        if session == SessionName::Same
            && let Some(Line::Events(run)) = lines.last_mut()
            && run.stream == stream
        {
            run.items.push(item);
            run.bad_fields += bad_fields;
            continue;
        }
        match &session {
            SessionName::Named(s) => previous = Some(s.clone()),
            SessionName::Missing => previous = None,
            SessionName::Same => {}
        }
        end_run(&mut lines);
        // Room for the rest of the chunk: a run never grows (each growth copied it), and
        // the room a shorter one leaves is given back when it ends.
        let mut items = Vec::with_capacity(count - i);
        items.push(item);
        lines.push(Line::Events(EventRun {
            session,
            stream,
            items,
            bad_fields,
        }));
    }
    end_run(&mut lines);
    raw.text.clear();
    // A buffer an overlong line grew, or a line list a block of blank lines grew, is let go
    // rather than kept round.
    if raw.text.capacity() <= 2 * CHUNK_BYTES && raw.lines.capacity() <= 4 * CHUNK_LINES {
        pools.raw.put((raw.text, raw.lines));
    }
    let chunk = Chunk {
        place: raw.place,
        lines,
    };
    (raw.seq, chunk)
}

/// The last line of `lines` is done: if it is a run that filled less than half its room, the
/// rest is given back (it is kept until the pipeline has applied the run).
fn end_run(lines: &mut [Line]) {
    if let Some(Line::Events(run)) = lines.last_mut()
        && run.items.capacity() > 2 * run.items.len()
    {
        run.items.shrink_to_fit();
    }
}

/// Reads `inputs` (opened by `open`, in order) and hands `each` their decoded chunks in file
/// order, decoding on `workers` threads; `each` takes the lines it wants out of the chunk.
/// A read error ends the input after every line read before it was handed on; an error of
/// `each` returns at once.
pub(super) fn read_decoded(
    inputs: Vec<PathBuf>,
    open: Open,
    workers: usize,
    mut each: impl FnMut(&mut Chunk) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let workers = workers.max(1);
    let pools = Arc::new(Pools {
        raw: Pool(Mutex::new(Vec::new())),
        lines: Pool(Mutex::new(Vec::new())),
    });
    // Chunks read and not yet handed on are bounded by tokens: the reader takes one for each
    // chunk, and one comes back when a chunk is handed on (however slow one chunk is to decode,
    // the others cannot pile up behind it).
    let in_flight = workers * QUEUED_PER_WORKER;
    let (tokens_back, tokens) = mpsc::sync_channel::<()>(in_flight);
    for _ in 0..in_flight {
        let _ = tokens_back.send(());
    }
    let (raw_tx, raw_rx) = mpsc::channel::<RawChunk>();
    let (done_tx, done_rx) = mpsc::channel::<(u64, Option<Chunk>)>();
    // The threads are not joined on an error of `each`: the reader may be blocked in a read of
    // a quiet pipe, which nothing cuts short. They end at their next hand-off (the channels
    // are closed then), or with the process.
    let reader = std::thread::Builder::new()
        .name("replay-read".to_owned())
        .spawn({
            let pools = pools.clone();
            move || read_chunks(&inputs, open, &pools.raw, &tokens, &raw_tx)
        })
        .context("starting the replay reader")?;
    let raw_rx = Arc::new(Mutex::new(raw_rx));
    for _ in 0..workers {
        let (raw_rx, done_tx, pools) = (raw_rx.clone(), done_tx.clone(), pools.clone());
        std::thread::Builder::new()
            .name("replay-decode".to_owned())
            .spawn(move || {
                loop {
                    // The lock is held only while waiting for the next chunk.
                    let next = raw_rx.lock().map(|rx| rx.recv());
                    let Ok(Ok(raw)) = next else { return };
                    let seq = raw.seq;
                    // A decoder that panics reports its chunk as lost, rather than leave a gap
                    // the chunks after it would wait behind for ever.
                    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        decode_chunk(raw, &pools)
                    }));
                    if done_tx.send((seq, decoded.ok().map(|(_, c)| c))).is_err() {
                        return;
                    }
                }
            })
            .context("starting a replay decoder")?;
    }
    drop(done_tx);
    // Back in the order read: a chunk waits here until those before it are handed on.
    let mut next = 0u64;
    let mut waiting: BTreeMap<u64, Chunk> = BTreeMap::new();
    for (seq, chunk) in done_rx {
        let chunk = chunk.ok_or_else(|| anyhow::anyhow!("a replay decoder failed"))?;
        waiting.insert(seq, chunk);
        while let Some(mut chunk) = waiting.remove(&next) {
            each(&mut chunk)?;
            chunk.lines.clear();
            pools.lines.put(chunk.lines);
            next += 1;
            let _ = tokens_back.send(());
        }
    }
    // The decoders are done, so the reader is: every chunk it read was handed on, and a read
    // error ends the input here.
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the replay reader panicked"))?
}

/// How an input is opened (a path, or `-` for stdin).
pub(super) type Open = fn(&std::path::Path) -> anyhow::Result<Box<dyn BufRead + Send>>;

/// The reading thread: every input's lines, in chunks, to the workers.
///
/// Each input is read a block at a time straight into a chunk's buffer and split into lines
/// there: reading line by line through a `BufRead` copied every byte twice (page cache to
/// reader buffer to chunk), and that copy was a third of the reading thread's time.
fn read_chunks(
    inputs: &[PathBuf],
    open: Open,
    spare: &Pool<ReadBuffers>,
    tokens: &mpsc::Receiver<()>,
    to_workers: &mpsc::Sender<RawChunk>,
) -> anyhow::Result<()> {
    // A chunk goes out only with a token; no token (the caller stopped): reading stops.
    let send = |chunk: RawChunk| tokens.recv().is_ok() && to_workers.send(chunk).is_ok();
    let fresh = |seq: u64, place: Place| {
        let (text, lines) = spare.take().unwrap_or_else(|| {
            (
                Vec::with_capacity(CHUNK_BYTES + 2 * BLOCK),
                Vec::with_capacity(CHUNK_LINES),
            )
        });
        RawChunk {
            seq,
            place,
            text,
            lines,
        }
    };
    let mut seq = 0u64;
    for (file, path) in inputs.iter().enumerate() {
        let mut r = open(path)?;
        let mut chunk = fresh(
            seq,
            Place {
                file,
                first_line: 1,
                bytes: 0,
            },
        );
        // Where the line being read starts in the chunk's text; whether it is too long (it
        // has its `None` already, and its bytes are dropped as they come, up to its end).
        let mut line_start = 0;
        let mut overlong = false;
        loop {
            let scan_from = chunk.text.len();
            // One read, whatever it brings: a quiet pipe does not hold back the lines it gave
            // until a whole block has come (a chunk still goes when full or at the end).
            chunk.text.resize(scan_from + BLOCK, 0);
            let read = loop {
                match r.read(&mut chunk.text[scan_from..]) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    other => break other,
                }
            };
            chunk
                .text
                .truncate(scan_from + *read.as_ref().unwrap_or(&0));
            let n = match read {
                Ok(n) => n,
                Err(e) => {
                    // The lines read whole before the error are handed on first.
                    chunk.text.truncate(line_start);
                    if !chunk.lines.is_empty() {
                        send(chunk);
                    }
                    return Err(e).with_context(|| format!("replay: reading {}", path.display()));
                }
            };
            chunk.place.bytes += n as u64;
            if n == 0 {
                // The input's end: a last line without its newline is a line too.
                if !overlong && chunk.text.len() > line_start {
                    chunk.lines.push(Some(line_start..chunk.text.len()));
                }
                break;
            }
            let mut pos = scan_from;
            while let Some(i) = memchr::memchr(b'\n', &chunk.text[pos..]) {
                let end = pos + i + 1;
                if overlong {
                    // The end of a line too long to keep: its bytes go, the rest moves up.
                    overlong = false;
                    chunk.text.drain(line_start..end);
                    pos = line_start;
                } else {
                    // A line ends here; one longer than MAX_LINE (its newline aside) is
                    // skipped as if it had been seen growing past it.
                    let whole = end - line_start <= MAX_LINE + 1;
                    chunk.lines.push(whole.then_some(line_start..end));
                    line_start = end;
                    pos = end;
                }
            }
            if overlong {
                chunk.text.truncate(line_start);
            } else if chunk.text.len() - line_start > MAX_LINE {
                // Skipped unread, counted as one line.
                chunk.lines.push(None);
                chunk.text.truncate(line_start);
                overlong = true;
            }
            if chunk.lines.len() >= CHUNK_LINES || line_start >= CHUNK_BYTES {
                seq += 1;
                let first_line = chunk.place.first_line + chunk.lines.len() as u64;
                let mut next = fresh(
                    seq,
                    Place {
                        file,
                        first_line,
                        bytes: 0,
                    },
                );
                // The line being read goes on in the next chunk.
                next.text.extend_from_slice(&chunk.text[line_start..]);
                chunk.text.truncate(line_start);
                line_start = 0;
                if !send(std::mem::replace(&mut chunk, next)) {
                    return Ok(());
                }
            }
        }
        if !chunk.lines.is_empty() || chunk.place.bytes > 0 {
            seq += 1;
            if !send(chunk) {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A line decoded on its own (no turn ids shared with lines before it).
    fn decode_line(raw: &str, previous: Option<&str>) -> Decoded {
        super::decode_line(
            raw,
            previous,
            &mut TurnIds::default(),
            &mut WireEvent::default(),
        )
    }

    /// A chunk of `raw`'s lines (one per `\n`-ended line), decoded as a worker does.
    fn decode_text(raw: &str) -> Vec<Line> {
        let text = raw.as_bytes().to_vec();
        let mut lines = Vec::new();
        let mut start = 0;
        for (i, b) in text.iter().enumerate() {
            if *b == b'\n' {
                lines.push(Some(start..i));
                start = i + 1;
            }
        }
        let pools = Pools {
            raw: Pool(Mutex::new(Vec::new())),
            lines: Pool(Mutex::new(Vec::new())),
        };
        let chunk = RawChunk {
            seq: 0,
            place: Place::default(),
            text,
            lines,
        };
        decode_chunk(chunk, &pools).1.lines
    }

    /// The ids of a run's events.
    fn ids(run: &EventRun) -> Vec<&str> {
        run.items
            .iter()
            .map(|i| match i {
                Item::Event(e, _) => e.id.as_str(),
                Item::Invalid(_) => "invalid",
            })
            .collect()
    }

    fn open_file(p: &std::path::Path) -> anyhow::Result<Box<dyn BufRead + Send>> {
        Ok(Box::new(std::io::BufReader::new(std::fs::File::open(p)?)))
    }

    /// Event lines (ten for `fail`, more than a chunk for `quiet`), then what the path asks
    /// for: `fail` an I/O error, `quiet` a read that never returns (a pipe nobody writes to).
    fn open_odd(p: &std::path::Path) -> anyhow::Result<Box<dyn BufRead + Send>> {
        struct Odd {
            head: std::io::Cursor<Vec<u8>>,
            quiet: bool,
        }
        impl Read for Odd {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.head.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                if self.quiet {
                    // Blocks for good: nothing is ever sent, and the sender stays alive.
                    let (tx, rx) = mpsc::channel::<()>();
                    let _ = rx.recv();
                    drop(tx);
                }
                Err(std::io::Error::other("disk gone"))
            }
        }
        let quiet = p.ends_with("quiet");
        let lines = if quiet { CHUNK_LINES + 10 } else { 10 };
        let head: String = (0..lines).map(|i| event_line("s1", i) + "\n").collect();
        Ok(Box::new(std::io::BufReader::new(Odd {
            head: std::io::Cursor::new(head.into_bytes()),
            quiet,
        })))
    }

    #[test]
    fn a_read_error_ends_the_input_after_the_lines_read_before_it() {
        let mut handed = 0;
        let err = read_decoded(vec![PathBuf::from("fail")], open_odd, 2, |chunk| {
            handed += chunk.lines.drain(..).map(|l| l.lines()).sum::<u64>();
            Ok(())
        })
        .expect_err("the read error");
        assert!(format!("{err:#}").contains("disk gone"), "{err:#}");
        assert_eq!(handed, 10, "the lines read before the error were handed on");
    }

    #[test]
    fn an_error_of_the_caller_returns_while_the_reader_waits_on_a_quiet_input() {
        // The first chunk is handed on while the reader blocks in a read that never returns;
        // the caller's error must not wait for the reader (this test would never end if it did).
        let err = read_decoded(vec![PathBuf::from("quiet")], open_odd, 2, |_| {
            anyhow::bail!("the pipeline stopped")
        })
        .expect_err("the caller's error");
        assert!(err.to_string().contains("pipeline stopped"), "{err}");
    }

    fn event_line(session: &str, i: usize) -> String {
        format!(r#"{{"id":"e{i}","type":"user.message","content":"hi","session_id":"{session}"}}"#)
    }

    #[test]
    fn each_kind_of_line_decodes_to_its_own_variant() {
        assert!(matches!(
            decode_line("  \t", None),
            Decoded::Other(Line::Blank)
        ));
        assert!(matches!(
            decode_line("[1]", None),
            Decoded::Other(Line::Invalid("not_object"))
        ));
        assert!(matches!(
            decode_line(r#"{"type":"agent","id":"ag_1","name":"coder"}"#, None),
            Decoded::Other(Line::Agent(Some(WireAgentObject { .. })))
        ));
        assert!(matches!(
            decode_line(r#"{"type":"session","id":"s1","status":"idle"}"#, None),
            Decoded::Other(Line::Session(Some(_)))
        ));
        let Decoded::Other(Line::Thread { session, .. }) = decode_line(
            r#"{"type":"session_thread","id":"t1","session_id":"s1","parent_thread_id":"t0"}"#,
            None,
        ) else {
            panic!("a thread line");
        };
        assert_eq!(session.as_deref(), Some("s1"));
        let Decoded::Event {
            session,
            stream,
            item: Item::Event(event, _),
            ..
        } = decode_line(
            r#"{"id":"e1","type":"agent.message","content":"x","session_id":"s1","qoder_exporter_stream":"t1"}"#,
            None,
        )
        else {
            panic!("an event line");
        };
        assert_eq!(
            (session, stream.as_deref(), event.id.as_str()),
            (SessionName::Named("s1".to_owned()), Some("t1"), "e1")
        );
    }

    #[test]
    fn an_event_line_names_its_session_once_per_run() {
        let session_of = |raw: &str, previous: Option<&str>| match decode_line(raw, previous) {
            Decoded::Event { session, .. } => session,
            other => panic!("an event line, not {other:?}"),
        };
        let line = r#"{"id":"e1","type":"user.message","session_id":"s1"}"#;
        assert_eq!(session_of(line, Some("s1")), SessionName::Same);
        assert_eq!(
            session_of(line, Some("s2")),
            SessionName::Named("s1".to_owned())
        );
        assert_eq!(session_of(line, None), SessionName::Named("s1".to_owned()));
        let unnamed = r#"{"id":"e1","type":"user.message","session_id":""}"#;
        assert_eq!(session_of(unnamed, Some("")), SessionName::Missing);
        // In a chunk: the lines of one session and stream go as one run that names the session
        // once; a line without one, another session, or another stream begins a new run.
        let raw = [
            r#"{"id":"a","type":"x","session_id":"s1"}"#,
            r#"{"id":"b","type":"x","session_id":"s1"}"#,
            r#"{"id":"c","type":"x"}"#,
            r#"{"id":"d","type":"x","session_id":"s1"}"#,
            r#"{"id":"e","type":"x","session_id":"s1","qoder_exporter_stream":"t1"}"#,
            r#"{"id":"f","type":"x","session_id":"s1","qoder_exporter_stream":"t1"}"#,
            r#"{"id":"g","type":"x","session_id":"s2"}"#,
            r#"{"type":"session","id":"s2"}"#,
            r#"{"id":"h","type":"x","session_id":"s2"}"#,
        ]
        .map(|l| format!("{l}\n"))
        .concat();
        let lines = decode_text(&raw);
        let runs: Vec<(&SessionName, Option<&str>, Vec<&str>)> = lines
            .iter()
            .filter_map(|l| match l {
                Line::Events(run) => Some((&run.session, run.stream.as_deref(), ids(run))),
                _ => None,
            })
            .collect();
        let (s1, s2) = (
            SessionName::Named("s1".to_owned()),
            SessionName::Named("s2".to_owned()),
        );
        assert_eq!(
            runs,
            [
                (&s1, None, vec!["a", "b"]),
                (&SessionName::Missing, None, vec!["c"]),
                (&s1, None, vec!["d"]),
                (&SessionName::Same, Some("t1"), vec!["e", "f"]),
                (&s2, None, vec!["g"]),
                (&SessionName::Same, None, vec!["h"]),
            ]
        );
        assert!(
            matches!(lines[5], Line::Session(Some(_))),
            "the session line stays between the runs it separates"
        );
    }

    #[test]
    fn a_short_run_gives_back_the_room_left_for_the_rest_of_its_chunk() {
        let raw: String = std::iter::once(event_line("s1", 0))
            .chain((1..200).map(|i| event_line("s2", i)))
            .map(|l| l + "\n")
            .collect();
        let lines = decode_text(&raw);
        let [Line::Events(short), Line::Events(long)] = &lines[..] else {
            panic!("two runs, not {lines:?}");
        };
        assert_eq!((short.items.len(), long.items.len()), (1, 199));
        assert!(short.items.capacity() <= 2, "{}", short.items.capacity());
        assert_eq!(
            long.items.capacity(),
            199,
            "the last run had exactly its room"
        );
    }

    #[test]
    fn chunks_come_back_in_file_order_with_their_places_whatever_the_workers_do() {
        let dir = tempfile::tempdir().expect("dir");
        let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
        let mut fa = std::fs::File::create(&a).expect("a");
        for i in 0..5000 {
            writeln!(fa, "{}", event_line("s1", i)).expect("write");
        }
        // An overlong line, a line that is not UTF-8, and a last line without a newline.
        let mut fb = std::fs::File::create(&b).expect("b");
        writeln!(fb, "{}", event_line("s2", 0)).expect("write");
        fb.write_all(&vec![b'x'; MAX_LINE + 10]).expect("write");
        fb.write_all(b"\n").expect("write");
        fb.write_all(br#"{"id":"e2","type":"user.message","content":"caf"#)
            .expect("write");
        fb.write_all(&[0xff]).expect("write");
        fb.write_all(b"\",\"session_id\":\"s2\"}\n").expect("write");
        fb.write_all(event_line("s2", 3).as_bytes()).expect("write");
        drop((fa, fb));
        let inputs = vec![a.clone(), b.clone()];
        let mut seen: Vec<(usize, u64, String)> = Vec::new();
        let mut bytes = 0;
        read_decoded(inputs, open_file, 3, |chunk| {
            bytes += chunk.place.bytes;
            let mut line_no = chunk.place.first_line;
            for line in chunk.lines.drain(..) {
                let what: Vec<String> = match &line {
                    Line::Events(run) => ids(run).into_iter().map(str::to_owned).collect(),
                    Line::TooLarge => vec!["too large".to_owned()],
                    other => vec![format!("{other:?}")],
                };
                for w in what {
                    seen.push((chunk.place.file, line_no, w));
                    line_no += 1;
                }
            }
            Ok(())
        })
        .expect("read");
        let expected_bytes =
            std::fs::metadata(&a).expect("a").len() + std::fs::metadata(&b).expect("b").len();
        assert_eq!(bytes, expected_bytes, "every byte read is accounted for");
        assert_eq!(seen.len(), 5004);
        for (i, (file, line, id)) in seen[..5000].iter().enumerate() {
            assert_eq!(
                (*file, *line, id.as_str()),
                (0, i as u64 + 1, format!("e{i}").as_str())
            );
        }
        let tail: Vec<(usize, u64, &str)> = seen[5000..]
            .iter()
            .map(|(f, l, w)| (*f, *l, w.as_str()))
            .collect();
        assert_eq!(
            tail,
            [
                (1, 1, "e0"),
                (1, 2, "too large"),
                (1, 3, "e2"),
                (1, 4, "e3")
            ]
        );
    }

    #[test]
    fn an_error_of_the_consumer_stops_the_reader_and_the_workers() {
        let dir = tempfile::tempdir().expect("dir");
        let a = dir.path().join("a.jsonl");
        let text: String = (0..20_000).map(|i| event_line("s1", i) + "\n").collect();
        std::fs::write(&a, text).expect("write");
        let mut chunks = 0;
        let err = read_decoded(vec![a], open_file, 2, |_| {
            chunks += 1;
            anyhow::ensure!(chunks < 2, "the pipeline stopped");
            Ok(())
        })
        .expect_err("the consumer's error");
        assert!(err.to_string().contains("pipeline stopped"), "{err}");
        assert_eq!(chunks, 2, "nothing handed on after the error");
    }
}
