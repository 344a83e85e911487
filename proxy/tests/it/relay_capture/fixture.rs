//! The fixture format (see `proxy/src/relay/fixtures/README.md`), the checks every capture
//! must pass, and the replacement of the server statement names, which differ from run to run.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::recorder::Chunk;

/// A direction through Sluice, as the fixtures write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dir {
    /// `c`: client → Sluice (input).
    ClientIn,
    /// `>`: Sluice → server (output).
    ServerOut,
    /// `s`: server → Sluice (input).
    ServerIn,
    /// `<`: Sluice → client (output).
    ClientOut,
}

impl Dir {
    pub const ALL: [Dir; 4] = [Dir::ClientIn, Dir::ServerOut, Dir::ServerIn, Dir::ClientOut];

    pub fn symbol(self) -> char {
        match self {
            Dir::ClientIn => 'c',
            Dir::ServerOut => '>',
            Dir::ServerIn => 's',
            Dir::ClientOut => '<',
        }
    }
}

/// The messages of a stream as (tag, body); an error unless it is whole messages, exactly.
pub fn messages(stream: &[u8]) -> Result<Vec<(u8, &[u8])>, String> {
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        if rest.len() < 5 {
            return Err(format!("{} bytes left, less than a header", rest.len()));
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if len < 4 {
            return Err(format!("message '{}' has length {len}", rest[0] as char));
        }
        if rest.len() < 1 + len {
            return Err(format!(
                "message '{}' of length {len} cut short: {} bytes left",
                rest[0] as char,
                rest.len() - 1
            ));
        }
        out.push((rest[0], &rest[5..1 + len]));
        rest = &rest[1 + len..];
    }
    Ok(out)
}

/// Everything recorded in one direction, in order.
pub fn stream(chunks: &[Chunk], dir: Dir) -> Vec<u8> {
    chunks
        .iter()
        .filter(|c| c.dir == dir)
        .flat_map(|c| c.bytes.iter().copied())
        .collect()
}

/// What every fixture must be: it starts with the client, each direction is whole messages,
/// the client's ends with Terminate and Sluice's to the client with ReadyForQuery.
pub fn check(chunks: &[Chunk]) -> Result<(), String> {
    match chunks.first() {
        Some(c) if c.dir == Dir::ClientIn => {}
        Some(c) => return Err(format!("starts with '{}', not 'c'", c.dir.symbol())),
        None => return Err("nothing recorded".into()),
    }
    for dir in Dir::ALL {
        let s = stream(chunks, dir);
        let msgs = messages(&s).map_err(|e| format!("'{}' stream: {e}", dir.symbol()))?;
        let last = msgs.last().map(|m| m.0);
        match dir {
            Dir::ClientIn if last != Some(b'X') => {
                return Err("the 'c' stream does not end with Terminate".into())
            }
            Dir::ClientOut if last != Some(b'Z') => {
                return Err("the '<' stream does not end with ReadyForQuery".into())
            }
            _ => {}
        }
        if dir == Dir::ClientIn && msgs.iter().filter(|m| m.0 == b'X').count() != 1 {
            return Err("the 'c' stream has Terminate before its end".into());
        }
    }
    if chunks.iter().any(|c| c.bytes.is_empty()) {
        return Err("an empty chunk".into());
    }
    Ok(())
}

const NAME_PREFIX: &[u8] = b"sluice_";
const HASH_DIGITS: usize = 16;

/// Replaces the server statement names (`sluice_` and 16 hex digits of a hash keyed anew in
/// every Sluice process) by `sluice_` and the statement's number, in 16 hex digits, in order of
/// first appearance: same length, so message lengths stay right. Returns how many statements.
pub fn normalise_statement_names(chunks: &mut [Chunk]) -> usize {
    // Names may straddle chunks: work on each direction's stream, keeping chunk boundaries.
    let mut found: Vec<(usize, usize, Vec<u8>)> = Vec::new();
    let mut streams = HashMap::new();
    for dir in Dir::ALL {
        let s = stream(chunks, dir);
        let starts: Vec<(usize, usize)> = chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.dir == dir)
            .scan(0, |at, (i, c)| {
                let start = *at;
                *at += c.bytes.len();
                Some((i, start))
            })
            .collect();
        for pos in name_positions(&s) {
            let (index, start) = starts
                .iter()
                .rev()
                .find(|(_, start)| *start <= pos)
                .copied()
                .unwrap_or((0, 0));
            let digits = s[pos + NAME_PREFIX.len()..pos + NAME_PREFIX.len() + HASH_DIGITS].to_vec();
            found.push((index, pos - start, digits));
        }
        streams.insert(dir, s);
    }
    found.sort();
    let mut numbers: HashMap<Vec<u8>, usize> = HashMap::new();
    for (_, _, digits) in &found {
        let next = numbers.len() + 1;
        numbers.entry(digits.clone()).or_insert(next);
    }
    for dir in Dir::ALL {
        let s = streams.get_mut(&dir).expect("every direction");
        for pos in name_positions(s) {
            let at = pos + NAME_PREFIX.len();
            let number = numbers[&s[at..at + HASH_DIGITS]];
            s[at..at + HASH_DIGITS].copy_from_slice(format!("{number:016x}").as_bytes());
        }
        let mut at = 0;
        for c in chunks.iter_mut().filter(|c| c.dir == dir) {
            let n = c.bytes.len();
            c.bytes.copy_from_slice(&s[at..at + n]);
            at += n;
        }
    }
    numbers.len()
}

/// Where `sluice_` and 16 lowercase hex digits start in `s`.
fn name_positions(s: &[u8]) -> Vec<usize> {
    let len = NAME_PREFIX.len() + HASH_DIGITS;
    (0..s.len().saturating_sub(len - 1))
        .filter(|&i| {
            s[i..].starts_with(NAME_PREFIX)
                && s[i + NAME_PREFIX.len()..i + len]
                    .iter()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        })
        .collect()
}

/// The fixture text: `#` description lines, `@ key = value` configuration lines, then one line
/// per chunk, its direction and its bytes in lowercase hex.
pub fn render(about: &[String], settings: &[(String, String)], chunks: &[Chunk]) -> String {
    let mut out = String::new();
    for line in about {
        if line.is_empty() {
            out.push_str("#\n");
        } else {
            writeln!(out, "# {line}").unwrap();
        }
    }
    for (key, value) in settings {
        writeln!(out, "@ {key} = {value}").unwrap();
    }
    for c in chunks {
        out.push(c.dir.symbol());
        out.push(' ');
        for b in &c.bytes {
            write!(out, "{b:02x}").unwrap();
        }
        out.push('\n');
    }
    out
}

/// A one-line summary of what a direction carried: message tags, with Query texts.
pub fn summary(chunks: &[Chunk], dir: Dir) -> Vec<String> {
    let s = stream(chunks, dir);
    let Ok(msgs) = messages(&s) else {
        return vec![format!("{} bytes, not whole messages", s.len())];
    };
    msgs.iter()
        .map(|(tag, body)| match tag {
            b'Q' => format!(
                "Query {:?}",
                String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(body))
            ),
            t => format!("'{}'", *t as char),
        })
        .collect()
}
