//! The fixed-size footer that ends every queue file.
//!
//! ```text
//! offset  len  field
//!  0      10   b"DMA-END 1 "   magic and format version
//! 10      12   msg_len         hex: length of the message part (max 2^48 - 1)
//! 22       1   b" "
//! 23       8   env_len         hex: length of the envelope
//! 31       1   b" "
//! 32       8   msg_crc         hex: CRC-32 (IEEE) of the message bytes
//! 40       1   b" "
//! 41       8   env_crc         hex: CRC-32 (IEEE) of the envelope bytes
//! 49       1   b" "
//! 50       4   flags           hex: bit 0 = the message has a byte >= 0x80; others 0
//! 54       1   b" "
//! 55       8   max_line        hex: longest message line in bytes without its LF
//!                              (saturated at ffffffff)
//! 63       1   b"\n"
//! ```
//!
//! All hex is lowercase and zero-padded; anything else is refused. A reader refuses a footer
//! whose version it does not know or whose flags set an unknown bit.

/// Length of the footer in bytes.
pub const FOOTER_LEN: usize = 64;
/// Largest message length the footer can describe.
pub const MAX_MSG_LEN: u64 = (1 << 48) - 1;
/// Flag bit: the message contains a byte >= 0x80.
pub const FLAG_8BIT: u16 = 1;
const KNOWN_FLAGS: u16 = FLAG_8BIT;
const MAGIC: &[u8; 10] = b"DMA-END 1 ";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    pub msg_len: u64,
    pub env_len: u32,
    pub msg_crc: u32,
    pub env_crc: u32,
    pub eight_bit: bool,
    /// Saturated at `u32::MAX` when stored.
    pub max_line: u64,
}

fn put_hex(out: &mut [u8], value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut v = value;
    for b in out.iter_mut().rev() {
        *b = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

fn get_hex(field: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for &b in field {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}

impl Footer {
    /// The 64 footer bytes. `msg_len` must be at most `MAX_MSG_LEN` (the writer checks).
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut f = [b' '; FOOTER_LEN];
        f[..10].copy_from_slice(MAGIC);
        put_hex(&mut f[10..22], self.msg_len.min(MAX_MSG_LEN));
        put_hex(&mut f[23..31], u64::from(self.env_len));
        put_hex(&mut f[32..40], u64::from(self.msg_crc));
        put_hex(&mut f[41..49], u64::from(self.env_crc));
        let flags = if self.eight_bit { FLAG_8BIT } else { 0 };
        put_hex(&mut f[50..54], u64::from(flags));
        put_hex(&mut f[55..63], self.max_line.min(u64::from(u32::MAX)));
        f[63] = b'\n';
        f
    }

    /// Parse and check the syntax of a footer. The caller checks lengths against the file.
    pub fn decode(f: &[u8]) -> Result<Footer, String> {
        if f.len() != FOOTER_LEN {
            return Err(format!("footer is {} bytes, not {FOOTER_LEN}", f.len()));
        }
        if &f[..8] != b"DMA-END " {
            return Err("no DMA-END footer (bad magic)".into());
        }
        if &f[..10] != MAGIC {
            return Err(format!(
                "unknown footer version {:?}",
                String::from_utf8_lossy(&f[8..9])
            ));
        }
        if f[22] != b' ' || f[31] != b' ' || f[40] != b' ' || f[49] != b' ' || f[54] != b' ' {
            return Err("malformed footer (separators)".into());
        }
        if f[63] != b'\n' {
            return Err("malformed footer (no final newline)".into());
        }
        let field = |r: std::ops::Range<usize>, name: &str| {
            get_hex(&f[r]).ok_or_else(|| format!("malformed footer ({name} is not lowercase hex)"))
        };
        let msg_len = field(10..22, "msg_len")?;
        let env_len = field(23..31, "env_len")? as u32;
        let msg_crc = field(32..40, "msg_crc")? as u32;
        let env_crc = field(41..49, "env_crc")? as u32;
        let flags = field(50..54, "flags")? as u16;
        let max_line = field(55..63, "max_line")?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(format!("footer has unknown flags {flags:04x}"));
        }
        Ok(Footer {
            msg_len,
            env_len,
            msg_crc,
            env_crc,
            eight_bit: flags & FLAG_8BIT != 0,
            max_line,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        Footer {
            msg_len: 0x1234_5678_9abc,
            env_len: 0xdead,
            msg_crc: 0xcbf4_3926,
            env_crc: 0x0000_0001,
            eight_bit: true,
            max_line: 998,
        }
    }

    #[test]
    fn round_trip() {
        let f = sample();
        let b = f.encode();
        assert_eq!(b.len(), FOOTER_LEN);
        assert_eq!(
            &b[..],
            &b"DMA-END 1 123456789abc 0000dead cbf43926 00000001 0001 000003e6\n"[..]
        );
        assert_eq!(Footer::decode(&b).unwrap(), f);
        let mut g = f;
        g.eight_bit = false;
        g.msg_len = 0;
        assert_eq!(Footer::decode(&g.encode()).unwrap(), g);
    }

    #[test]
    fn max_line_saturates() {
        let mut f = sample();
        f.max_line = 1 << 40;
        let d = Footer::decode(&f.encode()).unwrap();
        assert_eq!(d.max_line, u64::from(u32::MAX));
    }

    #[test]
    fn refuses_damage() {
        let good = sample().encode();
        let cases: &[(usize, u8, &str)] = &[
            (0, b'X', "magic"),
            (8, b'2', "version"),
            (22, b'x', "separators"),
            (63, b' ', "newline"),
            (12, b'G', "msg_len"),
            (12, b'A', "msg_len"),
            (52, b'2', "unknown flags"),
        ];
        for &(at, byte, what) in cases {
            let mut b = good;
            b[at] = byte;
            let e = Footer::decode(&b).unwrap_err();
            assert!(e.contains(what), "{what}: {e}");
        }
        assert!(Footer::decode(&good[1..]).is_err());
    }
}
