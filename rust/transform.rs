//! Streaming byte transforms. Every transform carries its state across chunk boundaries, so its
//! output never depends on how the input was cut into chunks.
//!
//! Output side (`Transform`, stored message -> wire or mailbox):
//! - `raw`: the stored bytes.
//! - `crlf`: LF -> CRLF; a CR that is not part of a line end is left alone; no terminator.
//! - `smtp`: LF -> CRLF, a line starting with "." gets one more "." (RFC 5321 4.5.2), then the
//!   terminator: ".\r\n" for an empty message or one ending in LF, else "\r\n.\r\n".
//! - `smtp-wrap`: `smtp`, and a line longer than `SMTP_LINE_LIMIT` (998) octets is broken the
//!   way Postfix does (`smtp_line_length_limit`): after every 998 octets of an output line,
//!   "\r\n " is inserted, and the continuation (its leading space included) again counts toward
//!   998. The dot added by stuffing is not counted (RFC 5321 4.5.3.1.6); stuffing applies only
//!   at real line starts. A line of at most 998 octets is output exactly as by `smtp`.
//! - `mbox`: mboxrd: a line matching `^>*From ` gets one more ">"; a missing final LF is added
//!   (not to an empty message); then one empty line ("\n") ends the entry.
//!
//! Input side (`Normalizer`, submitted bytes -> stored message): CRLF -> LF (a bare CR is kept),
//! and, when `dot_ends`, a line that is exactly "." (".\n", ".\r\n", or "." at EOF) ends input.
//!
//! The hot loops find line ends with `memchr` and copy whole runs with `extend_from_slice`:
//! no per-byte branches on ordinary text and no allocation per line.

use crate::error::{CoreError, Result};
use memchr::memchr;

/// Call `f` with the index of every LF in `data`, in order. Dense newlines (short lines) are
/// the common case of mail, where calling `memchr` once per line costs more than the copy; on
/// x86_64 this scans 32 bytes at a time with SSE2 (always present there) and walks the bit
/// mask, elsewhere it uses `memchr_iter`.
#[inline(always)]
fn for_each_lf(data: &[u8], mut f: impl FnMut(usize)) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
        };
        let len = data.len();
        let p = data.as_ptr();
        let mut i = 0usize;
        // SAFETY: SSE2 is part of the x86_64 baseline. Each iteration reads data[i..i + 32],
        // which is in bounds because i + 32 <= len; unaligned loads are used.
        unsafe {
            let lf = _mm_set1_epi8(b'\n' as i8);
            while i + 32 <= len {
                let a = _mm_loadu_si128(p.add(i) as *const __m128i);
                let b = _mm_loadu_si128(p.add(i + 16) as *const __m128i);
                let ma = _mm_movemask_epi8(_mm_cmpeq_epi8(a, lf)) as u32;
                let mb = _mm_movemask_epi8(_mm_cmpeq_epi8(b, lf)) as u32;
                let mut mask = ma | (mb << 16);
                while mask != 0 {
                    f(i + mask.trailing_zeros() as usize);
                    mask &= mask - 1;
                }
                i += 32;
            }
        }
        for (j, &b) in data[i..].iter().enumerate() {
            if b == b'\n' {
                f(i + j);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for nl in memchr::memchr_iter(b'\n', data) {
        f(nl);
    }
}

/// The output transforms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Raw,
    Crlf,
    Smtp,
    /// `smtp` with long lines broken at `SMTP_LINE_LIMIT` octets.
    SmtpWrap,
    Mbox,
}

/// Longest output line of `smtp-wrap` in octets, CRLF excluded (RFC 5321 4.5.3.1.6: 1000
/// with the CRLF; Postfix `smtp_line_length_limit`).
pub const SMTP_LINE_LIMIT: usize = 998;

impl Kind {
    pub const NAMES: [&'static str; 5] = ["raw", "crlf", "smtp", "smtp-wrap", "mbox"];
    pub const ALL: [Kind; 5] = [
        Kind::Raw,
        Kind::Crlf,
        Kind::Smtp,
        Kind::SmtpWrap,
        Kind::Mbox,
    ];

    pub fn parse(name: &str) -> Result<Kind> {
        match name {
            "raw" => Ok(Kind::Raw),
            "crlf" => Ok(Kind::Crlf),
            "smtp" => Ok(Kind::Smtp),
            "smtp-wrap" => Ok(Kind::SmtpWrap),
            "mbox" => Ok(Kind::Mbox),
            _ => Err(CoreError::usage(format!(
                "unknown kind {name:?}: expected one of raw, crlf, smtp, smtp-wrap, mbox"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Crlf => "crlf",
            Kind::Smtp => "smtp",
            Kind::SmtpWrap => "smtp-wrap",
            Kind::Mbox => "mbox",
        }
    }
}

const FROM: &[u8; 5] = b"From ";

/// A streaming output transform: `feed` chunks in order, then `finish` once.
#[derive(Clone, Debug)]
pub struct Transform {
    kind: Kind,
    /// The next input byte starts a line.
    at_line_start: bool,
    /// Some input has been seen (or the transform resumed after offset 0).
    any: bool,
    /// The last input byte seen.
    last: u8,
    /// mbox: at a line start, matching `>*From `. The bytes matched so far (`gt` ">" then the
    /// first `from` bytes of "From ") are held back until the match succeeds or fails.
    in_prefix: bool,
    gt: u64,
    from: usize,
    /// smtp-wrap: octets in the current output line (the stuffed dot not counted).
    col: usize,
    finished: bool,
}

impl Transform {
    /// A transform for a whole message, from its first byte.
    pub fn new(kind: Kind) -> Transform {
        Transform::resume(kind, None)
    }

    /// A transform that starts at some offset of the message; `prev` is the byte just before
    /// it (None at offset 0). That byte tells whether the offset is at a line start; an mbox
    /// or smtp insertion belongs before the line's first byte, so a resumed mid-line transform
    /// has nothing to insert until the next line.
    pub fn resume(kind: Kind, prev: Option<u8>) -> Transform {
        let at_line_start = prev.is_none_or(|b| b == b'\n');
        Transform {
            kind,
            at_line_start,
            any: prev.is_some(),
            last: prev.unwrap_or(0),
            in_prefix: kind == Kind::Mbox && at_line_start,
            gt: 0,
            from: 0,
            col: 0,
            finished: false,
        }
    }

    /// `resume` for a transform whose line position matters (`smtp-wrap` counts octets per
    /// line): `line_pos` is the number of source bytes between the start of the current line
    /// and the resume offset (0 at a line start). Other kinds ignore it.
    pub fn resume_in_line(kind: Kind, prev: Option<u8>, line_pos: u64) -> Transform {
        let mut t = Transform::resume(kind, prev);
        if !t.at_line_start {
            t.col = wrap_col(line_pos);
        }
        t
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Input bytes fed but not yet reflected in the output (mbox holds back a possible
    /// `>*From ` prefix). The source position whose output is complete is
    /// `consumed - held()`, always a line start when non-zero.
    pub fn held(&self) -> u64 {
        if self.in_prefix {
            self.gt + self.from as u64
        } else {
            0
        }
    }

    /// Transform `input`, appending to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        debug_assert!(!self.finished, "feed after finish");
        let Some(&last) = input.last() else { return };
        match self.kind {
            Kind::Raw => out.extend_from_slice(input),
            Kind::Crlf => self.feed_crlf(input, out, false),
            Kind::Smtp => self.feed_crlf(input, out, true),
            Kind::SmtpWrap => self.feed_wrap(input, out),
            Kind::Mbox => self.feed_mbox(input, out),
        }
        self.any = true;
        self.last = last;
    }

    /// End of input: flush what is held back and add the terminator of the kind.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        self.finished = true;
        match self.kind {
            Kind::Raw | Kind::Crlf => {}
            Kind::Smtp | Kind::SmtpWrap => {
                if self.any && self.last != b'\n' {
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b".\r\n");
            }
            Kind::Mbox => {
                if self.in_prefix {
                    self.flush_prefix(false, out);
                }
                if self.any && self.last != b'\n' {
                    out.push(b'\n');
                }
                out.push(b'\n');
            }
        }
    }

    /// LF -> CRLF, and with `stuff` a "." at a line start is doubled.
    ///
    /// This is the hottest loop of delivery, so it writes into reserved capacity through raw
    /// pointers, and copies a line of at most BLOCK bytes (most mail lines, base64 included)
    /// as one fixed-size BLOCK copy that may run past the line end: a constant-size copy is a
    /// few vector moves, where a variable one is a call and mispredicted branches. The excess
    /// never passes the input or the reserved output, and later writes overwrite it.
    fn feed_crlf(&mut self, input: &[u8], out: &mut Vec<u8>, stuff: bool) {
        const BLOCK: usize = 80;
        const SLACK: usize = 2 * BLOCK;
        let len = input.len();
        // Every input byte becomes at most two output bytes ("\n" -> "\r\n", "." -> "..").
        out.reserve(2 * len + SLACK);
        let mut at_start = self.at_line_start;
        let src = input.as_ptr();
        let base = out.len();
        // SAFETY: `out` has at least 2 * len + SLACK bytes of spare capacity after `base`.
        // The output for input[..p] is at most 2 * p bytes, so at a line starting at `pos`
        // the write position is at most 2 * pos + 1 (after a stuffed dot) and a BLOCK copy
        // ends at most at 2 * len + 1 + BLOCK < 2 * len + SLACK. A BLOCK copy reads
        // input[from..from + BLOCK] only when from + BLOCK <= len (checked); other copies
        // read exactly the line. Source and destination are distinct allocations. Output
        // bytes are produced in order without gaps, so [base, base + written) is initialised
        // when `set_len` runs; bytes past it (copy overrun) are left as spare capacity.
        unsafe {
            let start = out.as_mut_ptr().add(base);
            let mut dst = start;
            let mut pos = 0usize;
            let copy = |dst: *mut u8, from: usize, to: usize| {
                let n = to - from;
                if n <= BLOCK && from + BLOCK <= len {
                    std::ptr::copy_nonoverlapping(src.add(from), dst, BLOCK);
                } else {
                    std::ptr::copy_nonoverlapping(src.add(from), dst, n);
                }
            };
            for_each_lf(input, |nl| {
                if stuff && at_start && *src.add(pos) == b'.' {
                    *dst = b'.';
                    dst = dst.add(1);
                }
                copy(dst, pos, nl);
                dst = dst.add(nl - pos);
                *dst = b'\r';
                *dst.add(1) = b'\n';
                dst = dst.add(2);
                pos = nl + 1;
                at_start = true;
            });
            if pos < len {
                if stuff && at_start && *src.add(pos) == b'.' {
                    *dst = b'.';
                    dst = dst.add(1);
                }
                std::ptr::copy_nonoverlapping(src.add(pos), dst, len - pos);
                dst = dst.add(len - pos);
                at_start = false;
            }
            let written = dst.offset_from(start) as usize;
            debug_assert!(written <= 2 * len);
            out.set_len(base + written);
        }
        self.at_line_start = at_start;
    }

    /// `smtp-wrap`: LF -> CRLF, dot-stuffing at real line starts, and "\r\n " inserted
    /// before an octet that would make the output line longer than `SMTP_LINE_LIMIT`. The
    /// break is inserted lazily (only when another octet of the line follows), so a line of
    /// exactly the limit, and a chunk ending exactly at the limit, need no look-ahead.
    fn feed_wrap(&mut self, input: &[u8], out: &mut Vec<u8>) {
        // Output: every LF -> 2 bytes, a dot per line, 3 bytes per SMTP_LINE_LIMIT - 1 octets.
        out.reserve(input.len() + input.len() / (SMTP_LINE_LIMIT - 1) * 3 + input.len() / 2 + 8);
        let mut at_start = self.at_line_start;
        let mut col = self.col;
        let mut pos = 0usize;
        for_each_lf(input, |nl| {
            wrap_piece(&input[pos..nl], at_start, &mut col, out);
            out.extend_from_slice(b"\r\n");
            col = 0;
            at_start = true;
            pos = nl + 1;
        });
        if pos < input.len() {
            wrap_piece(&input[pos..], at_start, &mut col, out);
            at_start = false;
        }
        self.at_line_start = at_start;
        self.col = col;
    }

    /// Emit the held prefix: one extra ">" if it matched, then the ">"s and "From" bytes seen.
    fn flush_prefix(&mut self, matched: bool, out: &mut Vec<u8>) {
        let n = self.gt as usize + usize::from(matched);
        out.resize(out.len() + n, b'>');
        out.extend_from_slice(&FROM[..self.from]);
        self.in_prefix = false;
        self.gt = 0;
        self.from = 0;
    }

    /// mboxrd escaping. Runs of lines that cannot match are copied whole; only a line starting
    /// with ">" or "F" is looked at byte by byte, and only for its prefix.
    fn feed_mbox(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + 16);
        let len = input.len();
        // input[run..] has not been copied to `out` yet.
        let mut run = 0;
        if self.in_prefix {
            match self.match_prefix(input, 0, out) {
                Some(p) => run = p,
                None => return, // the whole chunk is still a possible prefix
            }
        }
        for_each_lf(input, |nl| {
            // A prefix never contains LF, so every LF reported lies at or after `run`.
            let ls = nl + 1;
            if ls == len {
                // The next chunk starts a line: match there.
                out.extend_from_slice(&input[run..]);
                run = len;
                self.in_prefix = true;
            } else if input[ls] == b'>' || input[ls] == b'F' {
                out.extend_from_slice(&input[run..ls]);
                self.in_prefix = true;
                run = self.match_prefix(input, ls, out).unwrap_or(len);
            }
        });
        out.extend_from_slice(&input[run..]);
    }

    /// Continue matching `>*From ` at `pos`, a line start (or the continuation of a held
    /// prefix). Returns the position after the bytes consumed, with the prefix emitted, or
    /// None when the input ended first (the prefix stays held). A mismatching byte, LF
    /// included, is not consumed.
    fn match_prefix(&mut self, input: &[u8], mut pos: usize, out: &mut Vec<u8>) -> Option<usize> {
        while pos < input.len() {
            let b = input[pos];
            if self.from == 0 && b == b'>' {
                self.gt += 1;
                pos += 1;
            } else if b == FROM[self.from] {
                self.from += 1;
                pos += 1;
                if self.from == FROM.len() {
                    self.flush_prefix(true, out);
                    return Some(pos);
                }
            } else {
                self.flush_prefix(false, out);
                return Some(pos);
            }
        }
        None
    }
}

/// Copy `piece`, a part of one line without its LF, breaking it at the line limit. `col` is
/// the output line's length so far; `at_start` says that `piece` begins a line.
#[inline]
fn wrap_piece(piece: &[u8], at_start: bool, col: &mut usize, out: &mut Vec<u8>) {
    let mut rest = piece;
    if at_start && rest.first() == Some(&b'.') {
        out.push(b'.');
    }
    if *col + rest.len() <= SMTP_LINE_LIMIT {
        // The common case: the line fits.
        out.extend_from_slice(rest);
        *col += rest.len();
        return;
    }
    while !rest.is_empty() {
        if *col == SMTP_LINE_LIMIT {
            out.extend_from_slice(b"\r\n ");
            *col = 1;
        }
        let n = rest.len().min(SMTP_LINE_LIMIT - *col);
        out.extend_from_slice(&rest[..n]);
        *col += n;
        rest = &rest[n..];
    }
}

/// The `smtp-wrap` output column after `line_pos` source octets of a line: the first output
/// line holds `SMTP_LINE_LIMIT` of them, each continuation a space and `SMTP_LINE_LIMIT - 1`.
fn wrap_col(line_pos: u64) -> usize {
    let limit = SMTP_LINE_LIMIT as u64;
    if line_pos <= limit {
        line_pos as usize
    } else {
        (1 + (line_pos - limit - 1) % (limit - 1) + 1) as usize
    }
}

/// Apply a transform to a whole buffer.
pub fn transform_all(kind: Kind, input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 16 + 8);
    let mut t = Transform::new(kind);
    t.feed(input, &mut out);
    t.finish(&mut out);
    out
}

/// What a line start holding "." means for `dot_ends`.
enum Dot {
    No,
    /// The lone-dot line, `n` input bytes long: input ends.
    End(usize),
    /// Cannot tell before more input arrives.
    Undecided,
}

fn dot_line(rest: &[u8], eof: bool) -> Dot {
    if rest.first() != Some(&b'.') {
        return Dot::No;
    }
    match rest.get(1) {
        None if eof => Dot::End(1),
        None => Dot::Undecided,
        Some(b'\n') => Dot::End(2),
        Some(b'\r') => match rest.get(2) {
            Some(b'\n') => Dot::End(3),
            None if !eof => Dot::Undecided,
            _ => Dot::No, // ".\r" then more text, or ".\r" at EOF: ordinary data
        },
        Some(_) => Dot::No,
    }
}

/// Normalises submitted input: CRLF -> LF, and the lone-dot end of input when `dot_ends`.
///
/// `feed` and `feed_head` consume a prefix of the input they are given and return its length;
/// the rest (at most the 2 bytes of a possible ".\r" or a CR whose LF has not arrived, or for
/// `feed_head` a line not yet complete) must be presented again with more input after it, or
/// with `eof` set when there is no more.
#[derive(Clone, Debug)]
pub struct Normalizer {
    dot_ends: bool,
    at_line_start: bool,
    finished: bool,
}

impl Normalizer {
    pub fn new(dot_ends: bool) -> Normalizer {
        Normalizer {
            dot_ends,
            at_line_start: true,
            finished: false,
        }
    }

    /// Input has ended (EOF was processed or the lone-dot line was seen).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Normalise `input` into `out`; returns the number of bytes consumed. Once finished,
    /// everything offered is consumed and dropped (text after the lone dot is not message).
    pub fn feed(&mut self, input: &[u8], eof: bool, out: &mut Vec<u8>) -> usize {
        out.reserve(input.len());
        self.feed_ranges(input, eof, |r| out.extend_from_slice(&input[r]))
    }

    /// `feed`, with the output given as ranges of `input`, in order (the output is always made
    /// of pieces of the input): `emit` is called for each non-empty one. Lets a caller write
    /// an unchanged run straight from its input buffer instead of copying it.
    pub fn feed_ranges(
        &mut self,
        input: &[u8],
        eof: bool,
        mut emit: impl FnMut(std::ops::Range<usize>),
    ) -> usize {
        if self.finished {
            return input.len();
        }
        let len = input.len();
        let mut out = |r: std::ops::Range<usize>| {
            if !r.is_empty() {
                emit(r)
            }
        };
        // input[run..] is not copied yet; `pos` is the start of the current line.
        let mut run = 0usize;
        let mut pos = 0usize;
        let mut at_start = self.at_line_start;
        let mut end = None; // consumed length, once the lone-dot line is found
        let dot_ends = self.dot_ends;
        for_each_lf(input, |nl| {
            if end.is_some() {
                return;
            }
            if dot_ends && at_start && input[pos] == b'.' {
                let line = &input[pos..nl];
                if line == b"." || line == b".\r" {
                    out(run..pos);
                    end = Some(nl + 1);
                    return;
                }
            }
            if nl > pos && input[nl - 1] == b'\r' {
                out(run..nl - 1);
                run = nl; // the LF starts the next run
            }
            pos = nl + 1;
            at_start = true;
        });
        if let Some(consumed) = end {
            self.finished = true;
            return consumed;
        }
        // The tail after the last LF: a partial line.
        let tail = &input[pos..];
        let mut stop = len;
        if dot_ends && at_start {
            match dot_line(tail, eof) {
                Dot::End(n) => {
                    out(run..pos);
                    self.finished = true;
                    return pos + n;
                }
                Dot::Undecided => stop = pos,
                Dot::No => {}
            }
        }
        if stop == len && !eof && tail.last() == Some(&b'\r') {
            stop = len - 1; // its LF may come with the next read
        }
        out(run..stop);
        if stop > pos {
            at_start = false;
        }
        self.at_line_start = at_start;
        if eof {
            self.finished = true;
        }
        stop
    }

    /// Read the head: whole normalised lines up to and including the first empty line, or the
    /// lone-dot line (consumed, not included), or EOF, or `limit` output bytes (cut after the
    /// last complete line that fits; a first line longer than `limit` is cut at exactly
    /// `limit`). Returns (consumed, done). When not done, call again with more input.
    pub fn feed_head(
        &mut self,
        input: &[u8],
        eof: bool,
        out: &mut Vec<u8>,
        limit: usize,
    ) -> (usize, bool) {
        let mut pos = 0;
        loop {
            if self.finished || out.len() >= limit {
                return (pos, true);
            }
            let rest = &input[pos..];
            if rest.is_empty() {
                if eof {
                    self.finished = true;
                    return (pos, true);
                }
                return (pos, false);
            }
            if self.dot_ends && self.at_line_start {
                match dot_line(rest, eof) {
                    Dot::End(n) => {
                        self.finished = true;
                        return (pos + n, true);
                    }
                    Dot::Undecided => return (pos, false),
                    Dot::No => {}
                }
            }
            let room = limit - out.len();
            match memchr(b'\n', rest) {
                Some(i) => {
                    let crlf = i > 0 && rest[i - 1] == b'\r';
                    let norm_len = if crlf { i } else { i + 1 };
                    if norm_len > room {
                        return (pos + self.cut(rest, out, room), true);
                    }
                    let empty = self.at_line_start && norm_len == 1;
                    if crlf {
                        out.extend_from_slice(&rest[..i - 1]);
                        out.push(b'\n');
                    } else {
                        out.extend_from_slice(&rest[..=i]);
                    }
                    pos += i + 1;
                    self.at_line_start = true;
                    if empty {
                        return (pos, true);
                    }
                }
                None if eof => {
                    if rest.len() > room {
                        return (pos + self.cut(rest, out, room), true);
                    }
                    out.extend_from_slice(rest);
                    self.at_line_start = false;
                    self.finished = true;
                    return (input.len(), true);
                }
                None => {
                    // At least this long once normalised (a final CR may be half a CRLF).
                    let known = rest.len() - usize::from(rest.last() == Some(&b'\r'));
                    if known > room {
                        return (pos + self.cut(rest, out, room), true);
                    }
                    return (pos, false);
                }
            }
        }
    }

    /// The line at `rest` does not fit in `room`. Stop before it if a line is already in the
    /// head; else take exactly `room` bytes of it (they hold no line end). Returns consumed.
    fn cut(&mut self, rest: &[u8], out: &mut Vec<u8>, room: usize) -> usize {
        if !out.is_empty() {
            return 0;
        }
        out.extend_from_slice(&rest[..room]);
        if room > 0 {
            self.at_line_start = false;
        }
        room
    }
}

/// Running statistics of message bytes: size, CRC-32, 8-bit content, longest line, number of
/// LFs.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    size: u64,
    eight_bit: bool,
    max_line: u64,
    cur_line: u64,
    lines: u64,
    crc: crc32fast::Hasher,
}

/// The line statistics of `data`, continuing a message: `cur` is the length of the line in
/// progress (updated), `max` the longest line so far, LF excluded (updated). Returns the number
/// of LFs and whether a byte >= 0x80 occurs.
///
/// On x86_64 this scans 32 bytes at a time with SSE2 and looks at the LF mask of a block only
/// once per block: the LF count is its popcount, and the longest line can only end at the
/// block's first LF, because a line between two LFs of one block is shorter than 32 bytes and
/// so only matters while `max` is below that. The 8-bit flag is an OR of the loaded vectors.
#[inline]
fn scan_lines(data: &[u8], cur: &mut u64, max: &mut u64) -> (u64, bool) {
    let len = data.len();
    let mut lines = 0u64;
    let mut high = 0u8;
    // The current line started at data[start] and had `c` bytes before data[0].
    let mut c = *cur;
    let mut m = *max;
    let mut start = 0usize;
    let mut i = 0usize;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
            _mm_set1_epi8, _mm_setzero_si128,
        };
        let p = data.as_ptr();
        // SAFETY: SSE2 is part of the x86_64 baseline. Each iteration reads data[i..i + 32],
        // in bounds because i + 32 <= len; unaligned loads are used.
        unsafe {
            let lf = _mm_set1_epi8(b'\n' as i8);
            let mut acc = _mm_setzero_si128();
            while i + 32 <= len {
                let a = _mm_loadu_si128(p.add(i) as *const __m128i);
                let b = _mm_loadu_si128(p.add(i + 16) as *const __m128i);
                acc = _mm_or_si128(acc, _mm_or_si128(a, b));
                let ma = _mm_movemask_epi8(_mm_cmpeq_epi8(a, lf)) as u32;
                let mb = _mm_movemask_epi8(_mm_cmpeq_epi8(b, lf)) as u32;
                let mask = ma | (mb << 16);
                if mask != 0 {
                    lines += u64::from(mask.count_ones());
                    let first = i + mask.trailing_zeros() as usize;
                    m = m.max(c + (first - start) as u64);
                    if m < 32 {
                        // Lines between this block's LFs may still be the longest.
                        let mut prev = first;
                        let mut rest = mask & (mask - 1);
                        while rest != 0 {
                            let nl = i + rest.trailing_zeros() as usize;
                            m = m.max((nl - prev - 1) as u64);
                            prev = nl;
                            rest &= rest - 1;
                        }
                    }
                    c = 0;
                    start = i + 32 - mask.leading_zeros() as usize;
                }
                i += 32;
            }
            if _mm_movemask_epi8(acc) != 0 {
                high = 0x80;
            }
        }
    }
    for (j, &b) in data[i..].iter().enumerate() {
        high |= b;
        if b == b'\n' {
            lines += 1;
            m = m.max(c + (i + j - start) as u64);
            c = 0;
            start = i + j + 1;
        }
    }
    c += (len - start) as u64;
    *cur = c;
    *max = m.max(c);
    (lines, high & 0x80 != 0)
}

impl Stats {
    pub fn new() -> Stats {
        Stats::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.size += data.len() as u64;
        self.crc.update(data);
        // One pass over the bytes gives the longest line, the LF count and the 8-bit flag.
        let (lines, eight_bit) = scan_lines(data, &mut self.cur_line, &mut self.max_line);
        self.lines += lines;
        self.eight_bit |= eight_bit;
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn eight_bit(&self) -> bool {
        self.eight_bit
    }
    pub fn max_line(&self) -> u64 {
        self.max_line
    }
    /// LF bytes seen (a final line without LF is not counted).
    pub fn lines(&self) -> u64 {
        self.lines
    }
    pub fn crc32(&self) -> u32 {
        self.crc.clone().finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNKS: [usize; 6] = [1, 2, 3, 7, 64, 1 << 20];

    fn run_chunked(kind: Kind, input: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut t = Transform::new(kind);
        for c in input.chunks(chunk) {
            t.feed(c, &mut out);
        }
        t.finish(&mut out);
        out
    }

    /// The transform of `input` for every chunk size; all must agree.
    fn tr(kind: Kind, input: &[u8]) -> Vec<u8> {
        let whole = transform_all(kind, input);
        for c in CHUNKS {
            assert_eq!(
                run_chunked(kind, input, c),
                whole,
                "kind {kind:?} chunk {c} input {:?}",
                String::from_utf8_lossy(&input[..input.len().min(200)])
            );
        }
        whole
    }

    /// A simple, obviously correct model of each transform, line by line.
    fn model(kind: Kind, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        if kind == Kind::Raw {
            return input.to_vec();
        }
        let mut lines: Vec<&[u8]> = input.split_inclusive(|&b| b == b'\n').collect();
        if input.is_empty() {
            lines.clear();
        }
        for line in &lines {
            let (body, nl) = match line.strip_suffix(b"\n") {
                Some(b) => (b, true),
                None => (*line, false),
            };
            match kind {
                Kind::Crlf | Kind::Smtp => {
                    if kind == Kind::Smtp && body.first() == Some(&b'.') {
                        out.push(b'.');
                    }
                    out.extend_from_slice(body);
                    if nl {
                        out.extend_from_slice(b"\r\n");
                    }
                }
                Kind::SmtpWrap => {
                    if body.first() == Some(&b'.') {
                        out.push(b'.');
                    }
                    let (first, mut rest) = body.split_at(body.len().min(SMTP_LINE_LIMIT));
                    out.extend_from_slice(first);
                    while !rest.is_empty() {
                        let (seg, r) = rest.split_at(rest.len().min(SMTP_LINE_LIMIT - 1));
                        out.extend_from_slice(b"\r\n ");
                        out.extend_from_slice(seg);
                        rest = r;
                    }
                    if nl {
                        out.extend_from_slice(b"\r\n");
                    }
                }
                Kind::Mbox => {
                    let gts = body.iter().take_while(|&&b| b == b'>').count();
                    if body[gts..].starts_with(b"From ") {
                        out.push(b'>');
                    }
                    out.extend_from_slice(body);
                    if nl {
                        out.push(b'\n');
                    }
                }
                Kind::Raw => unreachable!(),
            }
        }
        match kind {
            Kind::Smtp | Kind::SmtpWrap => {
                if !input.is_empty() && !input.ends_with(b"\n") {
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b".\r\n");
            }
            Kind::Mbox => {
                if !input.is_empty() && !input.ends_with(b"\n") {
                    out.push(b'\n');
                }
                out.push(b'\n');
            }
            _ => {}
        }
        out
    }

    fn all_kinds(input: &[u8]) {
        for kind in Kind::ALL {
            assert_eq!(tr(kind, input), model(kind, input), "kind {kind:?}");
        }
    }

    #[test]
    fn kinds_parse() {
        for n in Kind::NAMES {
            assert_eq!(Kind::parse(n).unwrap().name(), n);
        }
        assert!(matches!(Kind::parse("maildir"), Err(CoreError::Usage(_))));
    }

    #[test]
    fn empty_message() {
        assert_eq!(tr(Kind::Raw, b""), b"");
        assert_eq!(tr(Kind::Crlf, b""), b"");
        assert_eq!(tr(Kind::Smtp, b""), b".\r\n");
        assert_eq!(tr(Kind::Mbox, b""), b"\n");
    }

    #[test]
    fn smtp_basics() {
        assert_eq!(tr(Kind::Smtp, b"a\nb\n"), b"a\r\nb\r\n.\r\n");
        assert_eq!(tr(Kind::Smtp, b"a\nb"), b"a\r\nb\r\n.\r\n");
        assert_eq!(tr(Kind::Smtp, b"no newline"), b"no newline\r\n.\r\n");
        assert_eq!(tr(Kind::Smtp, b"\n"), b"\r\n.\r\n");
        assert_eq!(tr(Kind::Smtp, b".\n"), b"..\r\n.\r\n");
        assert_eq!(tr(Kind::Smtp, b"."), b"..\r\n.\r\n");
        assert_eq!(tr(Kind::Smtp, b"..\n"), b"...\r\n.\r\n");
        assert_eq!(
            tr(Kind::Smtp, b"a\n.b\n..c\nd.e\n"),
            b"a\r\n..b\r\n...c\r\nd.e\r\n.\r\n"
        );
        // a stored CR (from "\r\r\n" input) is data: untouched
        assert_eq!(tr(Kind::Smtp, b"a\rb\r\n"), b"a\rb\r\r\n.\r\n");
        assert_eq!(tr(Kind::Smtp, b"x\r"), b"x\r\r\n.\r\n");
    }

    fn line(n: usize, fill: u8) -> Vec<u8> {
        vec![fill; n]
    }

    /// Undo smtp-wrap: remove every inserted "\r\n ", then unstuff like smtp.
    fn unwrap_smtp(out: &[u8]) -> Vec<u8> {
        let body = out.strip_suffix(b".\r\n").expect("terminator");
        let mut joined = Vec::new();
        let mut i = 0;
        while i < body.len() {
            if body[i..].starts_with(b"\r\n ") {
                i += 3;
            } else {
                joined.push(body[i]);
                i += 1;
            }
        }
        let mut m = Vec::new();
        for l in joined.split_inclusive(|&b| b == b'\n') {
            let l = l.strip_prefix(b".").unwrap_or(l);
            m.extend_from_slice(&l[..l.len() - 2]);
            m.push(b'\n');
        }
        m
    }

    /// Every output line of smtp-wrap is at most 998 octets, not counting a stuffed dot.
    fn assert_lines_fit(out: &[u8]) {
        for l in out.split_inclusive(|&b| b == b'\n') {
            let body = l.strip_suffix(b"\r\n").unwrap_or(l);
            let n = body.len() - usize::from(body.starts_with(b".."));
            assert!(n <= SMTP_LINE_LIMIT, "line of {n}");
        }
    }

    #[test]
    fn smtp_wrap_edges() {
        let smtp = |m: &[u8]| tr(Kind::Smtp, m);
        let wrap = |m: &[u8]| {
            let w = tr(Kind::SmtpWrap, m);
            assert_eq!(w, model(Kind::SmtpWrap, m));
            assert_lines_fit(&w);
            w
        };
        // up to the limit: identical to smtp
        for n in [0, 1, 997, 998] {
            let mut m = line(n, b'a');
            m.push(b'\n');
            assert_eq!(wrap(&m), smtp(&m), "{n}");
            assert_eq!(wrap(&m[..n]), smtp(&m[..n]), "{n} without LF");
        }
        let a998 = line(998, b'a');
        let b997 = line(997, b'b');
        // 999: one break
        let mut m = a998.clone();
        m.extend_from_slice(b"b\n");
        assert_eq!(wrap(&m), [&a998[..], b"\r\n b\r\n.\r\n"].concat());
        // 1995 = 998 + 997: two output lines exactly full
        let m = [&a998[..], &b997[..], b"\n"].concat();
        assert_eq!(
            wrap(&m),
            [&a998[..], b"\r\n ", &b997[..], b"\r\n.\r\n"].concat()
        );
        // 1996 and 1997: a third output line of 1 and 2 octets (plus the space)
        let m = [&a998[..], &b997[..], b"c\n"].concat();
        assert_eq!(
            wrap(&m),
            [&a998[..], b"\r\n ", &b997[..], b"\r\n c\r\n.\r\n"].concat()
        );
        let m = [&a998[..], &b997[..], b"cd\n"].concat();
        assert_eq!(
            wrap(&m),
            [&a998[..], b"\r\n ", &b997[..], b"\r\n cd\r\n.\r\n"].concat()
        );
        // without a final newline
        let m = [&a998[..], b"xy"].concat();
        assert_eq!(wrap(&m), [&a998[..], b"\r\n xy\r\n.\r\n"].concat());
        // leading dot: stuffed, not counted; a continuation starting with "." is not stuffed
        let m = [b".", &a998[..], b".z\n"].concat();
        let want = [b"..", &a998[..997], b"\r\n a.z\r\n.\r\n"].concat();
        assert_eq!(wrap(&m), want);
        let m = [&a998[..], b".\n.\n"].concat();
        assert_eq!(wrap(&m), [&a998[..], b"\r\n .\r\n..\r\n.\r\n"].concat());
        // a CR in a long line is an ordinary octet, also right at the break
        let mut m = line(997, b'a');
        m.extend_from_slice(b"\r\rx\n");
        assert_eq!(
            wrap(&m),
            [&line(997, b'a')[..], b"\r\r\n \rx\r\n.\r\n"].concat()
        );
        // many breaks, several lines, round trip
        let mut m = line(10_000, b'x');
        m.extend_from_slice(b"\nshort\n.dot\n");
        m.extend(line(2500, b'.'));
        let w = wrap(&m);
        assert_eq!(unwrap_smtp(&w), [&m[..], b"\n"].concat());
    }

    #[test]
    fn smtp_wrap_resume_in_line() {
        let mut m = line(3000, b'x');
        m.extend_from_slice(b"\n");
        m.extend(line(2100, b'.'));
        let whole = transform_all(Kind::SmtpWrap, &m);
        for off in [
            1, 500, 997, 998, 999, 1000, 1994, 1995, 1996, 2999, 3000, 3001, 3002, 4000,
        ] {
            let ls = m[..off]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            // output for m[..off] without the terminator, then the resumed rest
            let mut head = Vec::new();
            let mut t = Transform::new(Kind::SmtpWrap);
            t.feed(&m[..off], &mut head);
            let mut rest = Vec::new();
            let mut r =
                Transform::resume_in_line(Kind::SmtpWrap, Some(m[off - 1]), (off - ls) as u64);
            r.feed(&m[off..], &mut rest);
            r.finish(&mut rest);
            assert!([head, rest].concat() == whole, "resume at {off}");
        }
    }

    #[test]
    fn crlf_basics() {
        assert_eq!(tr(Kind::Crlf, b"a\n\nb"), b"a\r\n\r\nb");
        assert_eq!(tr(Kind::Crlf, b".x\n"), b".x\r\n");
        assert_eq!(tr(Kind::Crlf, b"a\rb\n"), b"a\rb\r\n");
    }

    #[test]
    fn mbox_basics() {
        assert_eq!(tr(Kind::Mbox, b"From x\n"), b">From x\n\n");
        assert_eq!(tr(Kind::Mbox, b">From x\n"), b">>From x\n\n");
        assert_eq!(tr(Kind::Mbox, b">>From x\n"), b">>>From x\n\n");
        assert_eq!(tr(Kind::Mbox, b"From\n"), b"From\n\n");
        assert_eq!(tr(Kind::Mbox, b"Fromage\n"), b"Fromage\n\n");
        assert_eq!(tr(Kind::Mbox, b">Frim x\n"), b">Frim x\n\n");
        assert_eq!(tr(Kind::Mbox, b" From x\n"), b" From x\n\n");
        assert_eq!(tr(Kind::Mbox, b"a From x\n"), b"a From x\n\n");
        assert_eq!(tr(Kind::Mbox, b"abc"), b"abc\n\n");
        assert_eq!(tr(Kind::Mbox, b">>>"), b">>>\n\n");
        assert_eq!(tr(Kind::Mbox, b"From "), b">From \n\n");
        assert_eq!(tr(Kind::Mbox, b"Fro"), b"Fro\n\n");
        assert_eq!(
            tr(Kind::Mbox, b"a\nFrom b\n>From c\nFromd\n>\n>>\nFrom "),
            b"a\n>From b\n>>From c\nFromd\n>\n>>\n>From \n\n"
        );
    }

    #[test]
    fn nul_bytes_and_long_lines() {
        let mut m = b"a\0b\n\0\n.\0\nFrom \0\n".to_vec();
        m.extend(std::iter::repeat_n(b'x', 10_000));
        m.push(b'\n');
        m.extend(std::iter::repeat_n(b'>', 10_000));
        m.extend_from_slice(b"From long\n");
        m.extend(std::iter::repeat_n(b'.', 10_000));
        all_kinds(&m);
        let s = tr(Kind::Smtp, &m);
        assert!(s.starts_with(b"a\0b\r\n\0\r\n..\0\r\n"));
    }

    #[test]
    fn dot_and_crlf_at_every_boundary() {
        // Chunk boundaries land inside "\r\n." and ".\n" for the chunk sizes used.
        let m = b"a\r\n.\r\n..\n.\nb\r\n.x\n\r\n.";
        all_kinds(m);
    }

    #[test]
    fn generated_inputs_match_model() {
        // Deterministic pseudo-random messages over an alphabet that hits every special case.
        let alphabet: &[&[u8]] = &[
            b"\n",
            b"\r",
            b".",
            b">",
            b"From ",
            b"From",
            b"F",
            b"x",
            b"\0",
            b"\xff",
            b"\r\n",
            &[b'y'; 997],
            &[b'z'; 998],
            &[b'.'; 999],
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..400 {
            let mut m = Vec::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = (seed % 40) as usize;
            for _ in 0..n {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                m.extend_from_slice(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            all_kinds(&m);
        }
    }

    #[test]
    fn resume_mid_message() {
        let m = b"From a\n.b\n>From c\nxy\nFrom ";
        for kind in Kind::ALL {
            let whole = transform_all(kind, m);
            for off in 0..=m.len() {
                // Line starts are resumable points; the output from there is the whole output's
                // suffix for that line onwards.
                if off == 0 || m[off - 1] == b'\n' {
                    let mut out = Vec::new();
                    let mut t = Transform::resume(kind, off.checked_sub(1).map(|i| m[i]));
                    t.feed(&m[off..], &mut out);
                    t.finish(&mut out);
                    assert!(whole.ends_with(&out), "{kind:?} at {off}");
                }
            }
        }
        // Mid-line resume: nothing inserted for the rest of that line.
        let mut out = Vec::new();
        let mut t = Transform::resume(Kind::Mbox, Some(b'>'));
        t.feed(b"From x\nFrom y\n", &mut out);
        t.finish(&mut out);
        assert_eq!(out, b"From x\n>From y\n\n");
        let mut t = Transform::resume(Kind::Smtp, Some(b'a'));
        let mut out = Vec::new();
        t.feed(b".x", &mut out);
        t.finish(&mut out);
        assert_eq!(out, b".x\r\n.\r\n");
        // Resumed at the very end.
        let mut t = Transform::resume(Kind::Smtp, Some(b'\n'));
        let mut out = Vec::new();
        t.finish(&mut out);
        assert_eq!(out, b".\r\n");
    }

    #[test]
    fn held_prefix_is_counted() {
        let mut t = Transform::new(Kind::Mbox);
        let mut out = Vec::new();
        t.feed(b"a\n>>Fr", &mut out);
        assert_eq!(out, b"a\n");
        assert_eq!(t.held(), 4);
        t.feed(b"om x", &mut out);
        assert_eq!(t.held(), 0);
        assert_eq!(out, b"a\n>>>From x");
    }

    // ---- input normaliser ----

    fn norm_chunked(dot_ends: bool, input: &[u8], chunk: usize) -> (Vec<u8>, usize) {
        // Simulates the writer's buffer: unconsumed bytes are offered again with more input.
        let mut n = Normalizer::new(dot_ends);
        let mut out = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut consumed_total = 0;
        loop {
            let eof = fed == input.len();
            let c = n.feed(&buf, eof, &mut out);
            consumed_total += c;
            buf.drain(..c);
            if n.finished() {
                break;
            }
            assert!(!eof, "not finished at eof");
            let take = chunk.min(input.len() - fed);
            buf.extend_from_slice(&input[fed..fed + take]);
            fed += take;
        }
        (out, consumed_total)
    }

    fn norm(dot_ends: bool, input: &[u8]) -> Vec<u8> {
        let (whole, _) = norm_chunked(dot_ends, input, usize::MAX);
        for c in CHUNKS {
            assert_eq!(
                norm_chunked(dot_ends, input, c).0,
                whole,
                "dot_ends {dot_ends} chunk {c} input {:?}",
                String::from_utf8_lossy(input)
            );
        }
        whole
    }

    #[test]
    fn normalise_crlf() {
        for d in [false, true] {
            assert_eq!(norm(d, b"a\r\nb\r\n"), b"a\nb\n");
            assert_eq!(norm(d, b"a\rb\r"), b"a\rb\r");
            assert_eq!(norm(d, b"a\r\r\n"), b"a\r\n");
            assert_eq!(norm(d, b"\r\n\r\n"), b"\n\n");
            assert_eq!(norm(d, b"a\nb"), b"a\nb");
            assert_eq!(norm(d, b""), b"");
            assert_eq!(norm(d, b"\0\r\0\n"), b"\0\r\0\n");
        }
    }

    #[test]
    fn normalise_dot() {
        assert_eq!(norm(true, b"a\n.\nb\n"), b"a\n");
        assert_eq!(norm(true, b"a\r\n.\r\nb\n"), b"a\n");
        assert_eq!(norm(true, b"a\n."), b"a\n");
        assert_eq!(norm(true, b"."), b"");
        assert_eq!(norm(true, b".\n"), b"");
        assert_eq!(norm(true, b"a\n..\n"), b"a\n..\n");
        assert_eq!(norm(true, b"a\n.x\n"), b"a\n.x\n");
        assert_eq!(norm(true, b"a\n.\r"), b"a\n.\r");
        assert_eq!(norm(true, b"a\n.\rx\n"), b"a\n.\rx\n");
        assert_eq!(norm(true, b"a.\nb"), b"a.\nb");
        assert_eq!(norm(false, b"a\n.\nb\n"), b"a\n.\nb\n");
        assert_eq!(norm(false, b"a\r\n.\r\n"), b"a\n.\n");
        // the terminator consumes exactly its line
        let (_, consumed) = norm_chunked(true, b"a\n.\r\nrest", usize::MAX);
        assert_eq!(consumed, 5);
    }

    fn head_chunked(
        dot_ends: bool,
        input: &[u8],
        chunk: usize,
        limit: usize,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut n = Normalizer::new(dot_ends);
        let mut head = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut fed = 0;
        loop {
            let eof = fed == input.len();
            let (c, done) = n.feed_head(&buf, eof, &mut head, limit);
            buf.drain(..c);
            if done {
                break;
            }
            let take = chunk.min(input.len() - fed);
            buf.extend_from_slice(&input[fed..fed + take]);
            fed += take;
        }
        // the rest through feed()
        let mut body = Vec::new();
        loop {
            let eof = fed == input.len();
            let c = n.feed(&buf, eof, &mut body);
            buf.drain(..c);
            if n.finished() {
                break;
            }
            let take = chunk.min(input.len() - fed);
            buf.extend_from_slice(&input[fed..fed + take]);
            fed += take;
        }
        (head, body)
    }

    fn head(dot_ends: bool, input: &[u8], limit: usize) -> (Vec<u8>, Vec<u8>) {
        let whole = head_chunked(dot_ends, input, usize::MAX, limit);
        for c in CHUNKS {
            assert_eq!(
                head_chunked(dot_ends, input, c, limit),
                whole,
                "chunk {c} limit {limit} input {:?}",
                String::from_utf8_lossy(input)
            );
        }
        whole
    }

    #[test]
    fn head_block() {
        let m = b"A: 1\r\nB: 2\r\n\r\nbody\r\n.\r\nignored";
        let (h, b) = head(true, m, 1 << 20);
        assert_eq!(h, b"A: 1\nB: 2\n\n");
        assert_eq!(b, b"body\n");
        let (h, b) = head(false, m, 1 << 20);
        assert_eq!(h, b"A: 1\nB: 2\n\n");
        assert_eq!(b, b"body\n.\nignored");
        // no body, no empty line
        assert_eq!(
            head(true, b"A: 1\nB: 2", 100),
            (b"A: 1\nB: 2".to_vec(), vec![])
        );
        // lone dot ends the head
        assert_eq!(
            head(true, b"A: 1\n.\nB\n", 100),
            (b"A: 1\n".to_vec(), vec![])
        );
        assert_eq!(
            head(false, b"A: 1\n.\nB\n", 100),
            (b"A: 1\n.\nB\n".to_vec(), vec![])
        );
        // message starting with an empty line
        assert_eq!(
            head(true, b"\nbody\n", 100),
            (b"\n".to_vec(), b"body\n".to_vec())
        );
        assert_eq!(head(true, b"", 100), (vec![], vec![]));
    }

    #[test]
    fn head_limit() {
        let m = b"A: 12\r\nB: 34\r\n\r\nbody\n";
        // limit falls inside line 2: stop after line 1
        assert_eq!(
            head(true, m, 10),
            (b"A: 12\n".to_vec(), b"B: 34\n\nbody\n".to_vec())
        );
        // limit exactly at a line end
        assert_eq!(
            head(true, m, 12),
            (b"A: 12\nB: 34\n".to_vec(), b"\nbody\n".to_vec())
        );
        // first line longer than the limit: exact cut, the rest continues that line
        assert_eq!(
            head(true, m, 3),
            (b"A: ".to_vec(), b"12\nB: 34\n\nbody\n".to_vec())
        );
        // cut right before the CR of a CRLF
        assert_eq!(
            head(true, m, 5),
            (b"A: 12".to_vec(), b"\nB: 34\n\nbody\n".to_vec())
        );
        assert_eq!(
            head(true, m, 0),
            (vec![], b"A: 12\nB: 34\n\nbody\n".to_vec())
        );
        // a cut line that starts with "." is not a terminator afterwards
        assert_eq!(
            head(true, b".abc\n.\n", 2),
            (b".a".to_vec(), b"bc\n".to_vec())
        );
        // a long line without newline at EOF
        assert_eq!(head(true, b"abcdef", 4), (b"abcd".to_vec(), b"ef".to_vec()));
        assert_eq!(head(true, b"abc\r", 4), (b"abc\r".to_vec(), vec![]));
    }

    fn norm_model(dot_ends: bool, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in input.split_inclusive(|&b| b == b'\n') {
            if dot_ends && (line == b".\n" || line == b".\r\n" || line == b".") {
                break;
            }
            match line.strip_suffix(b"\r\n") {
                Some(body) => {
                    out.extend_from_slice(body);
                    out.push(b'\n');
                }
                None => out.extend_from_slice(line),
            }
        }
        out
    }

    #[test]
    fn generated_inputs_normalise_like_model() {
        let alphabet: &[&[u8]] = &[
            b"\n", b"\r", b".", b"\r\n", b"x", b"\0", b".\r\n", b"\n.\n", b": ",
        ];
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let n = (next() % 30) as usize;
            let mut m = Vec::new();
            for _ in 0..n {
                m.extend_from_slice(alphabet[(next() % alphabet.len() as u64) as usize]);
            }
            for d in [false, true] {
                let want = norm_model(d, &m);
                assert_eq!(norm(d, &m), want, "dot_ends {d} input {m:?}");
                for limit in [0, 1, 2, 5, 1 << 20] {
                    let (h, b) = head(d, &m, limit);
                    assert!(h.len() <= limit);
                    assert_eq!([h, b].concat(), want, "dot_ends {d} limit {limit} {m:?}");
                }
            }
        }
    }

    #[test]
    fn stats_match_model() {
        // Lines of every length around the 32-byte blocks, high bytes here and there, fed in
        // pieces cut at many offsets.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..300 {
            let mut data = Vec::new();
            let nlines = rnd(40);
            for _ in 0..nlines {
                let l = match rnd(4) {
                    0 => rnd(4),
                    1 => rnd(40),
                    2 => 28 + rnd(10),
                    _ => rnd(300),
                };
                for _ in 0..l {
                    data.push(if rnd(500) == 0 {
                        0x80 | rnd(128) as u8
                    } else {
                        b'a'
                    });
                }
                data.push(b'\n');
            }
            data.extend(std::iter::repeat_n(b'z', rnd(50) as usize));
            let want_lines = data.iter().filter(|&&b| b == b'\n').count() as u64;
            let want_max = data
                .split(|&b| b == b'\n')
                .map(|l| l.len() as u64)
                .max()
                .unwrap_or(0);
            let want_8 = data.iter().any(|&b| b >= 0x80);
            let mut s = Stats::new();
            let mut pos = 0;
            while pos < data.len() {
                let n =
                    (1 + rnd(if round % 2 == 0 { 8 } else { 200 }) as usize).min(data.len() - pos);
                s.update(&data[pos..pos + n]);
                pos += n;
            }
            assert_eq!(s.lines(), want_lines, "round {round}");
            assert_eq!(s.max_line(), want_max, "round {round}");
            assert_eq!(s.eight_bit(), want_8, "round {round}");
            assert_eq!(s.size(), data.len() as u64);
            let mut whole = Stats::new();
            whole.update(&data);
            assert_eq!((whole.lines(), whole.max_line()), (want_lines, want_max));
            assert_eq!(whole.eight_bit(), want_8);
        }
    }

    #[test]
    fn stats() {
        let mut s = Stats::new();
        s.update(b"ab\ncdef");
        s.update(b"gh\n\nxyz");
        assert_eq!(s.size(), 14);
        assert_eq!(s.max_line(), 6);
        assert_eq!(s.lines(), 3);
        assert!(!s.eight_bit());
        assert_eq!(s.crc32(), crc32fast::hash(b"ab\ncdefgh\n\nxyz"));
        s.update(b"\x80");
        assert!(s.eight_bit());
        let mut t = Stats::new();
        t.update(&vec![b'x'; 10_000]);
        assert_eq!(t.max_line(), 10_000);
        assert_eq!(t.lines(), 0);
        // LFs at every position of the SIMD blocks and in the scalar tail.
        let data: Vec<u8> = (0..1000u32)
            .map(|i| if i % 7 == 0 { b'\n' } else { b'a' })
            .collect();
        let want = data.iter().filter(|&&b| b == b'\n').count() as u64;
        for cut in [0, 1, 31, 32, 33, 999, 1000] {
            let mut u = Stats::new();
            u.update(&data[..cut]);
            u.update(&data[cut..]);
            assert_eq!(u.lines(), want, "cut {cut}");
        }
    }
}

#[cfg(test)]
mod perf {
    use super::*;

    /// CPU time of this thread: steadier than wall time on a shared machine.
    struct Instant(f64);
    impl Instant {
        fn now() -> Instant {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: valid timespec out-pointer.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            Instant(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
        }
        fn elapsed(&self) -> std::time::Duration {
            std::time::Duration::from_secs_f64(Instant::now().0 - self.0)
        }
    }

    /// `cargo test --release -- --ignored --nocapture transform_throughput`
    #[test]
    #[ignore]
    fn transform_throughput() {
        let mut text = Vec::new();
        while text.len() < (64 << 20) {
            text.extend_from_slice(
                b"Hello there, this is a line of ordinary text in a mail message.\n\
                  .a line with a leading dot\nFrom the start of a line\n>quoted reply\n\n\
                  QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\n",
            );
        }
        let mut out = Vec::with_capacity(2 * (1 << 20) + 64);
        for kind in Kind::ALL {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                let mut tr = Transform::new(kind);
                for c in text.chunks(1 << 20) {
                    out.clear();
                    tr.feed(c, &mut out);
                    std::hint::black_box(&out);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!("{kind:?}: {:.0} MB/s", text.len() as f64 / best / 1e6);
        }
        let mut input = Vec::new();
        for line in text.split_inclusive(|&b| b == b'\n') {
            input.extend_from_slice(&line[..line.len() - 1]);
            input.extend_from_slice(b"\r\n");
        }
        for dot_ends in [false, true] {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                let mut n = Normalizer::new(dot_ends);
                for c in input.chunks(1 << 20) {
                    out.clear();
                    n.feed(c, false, &mut out);
                    std::hint::black_box(&out);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "normalise dot_ends={dot_ends}: {:.0} MB/s",
                input.len() as f64 / best / 1e6
            );
        }
        // LF-only input (the common case of a local submission).
        for dot_ends in [false, true] {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                let mut n = Normalizer::new(dot_ends);
                for c in text.chunks(1 << 20) {
                    out.clear();
                    n.feed(c, false, &mut out);
                    std::hint::black_box(&out);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "normalise LF input dot_ends={dot_ends}: {:.0} MB/s",
                text.len() as f64 / best / 1e6
            );
        }
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let mut s = Stats::new();
            for c in text.chunks(1 << 20) {
                s.update(c);
            }
            std::hint::black_box(s.crc32());
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("stats: {:.0} MB/s", text.len() as f64 / best / 1e6);
        // As in the writer: the chunk was just written, so it is in the cache.
        let hot = &text[..1 << 20];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let mut s = Stats::new();
            for _ in 0..64 {
                s.update(hot);
            }
            std::hint::black_box(s.crc32());
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "stats, cached chunk: {:.0} MB/s",
            (64 << 20) as f64 / best / 1e6
        );
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let (mut cur, mut max) = (0, 0);
            for c in text.chunks(1 << 20) {
                std::hint::black_box(scan_lines(c, &mut cur, &mut max));
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "  of which lines: {:.0} MB/s",
            text.len() as f64 / best / 1e6
        );
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let mut h = crc32fast::Hasher::new();
            for c in text.chunks(1 << 20) {
                h.update(c);
            }
            std::hint::black_box(h.finalize());
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "  of which crc32: {:.0} MB/s",
            text.len() as f64 / best / 1e6
        );
    }
}
