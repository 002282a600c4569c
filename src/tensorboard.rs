//! TensorBoard event files, written directly: TFRecord framing (length and data, each with a
//! masked CRC32C) around hand-encoded `Event` protocol buffers holding scalars or PNG images.
//! Small enough to own, and it spares a protobuf toolchain.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// A new `events.out.tfevents.<time>.<host>.<pid>` file in `dir`, where TensorBoard
    /// (`tensorboard --logdir <dir or a parent>`) finds it, for a run whose next step is
    /// `step + 1`. Earlier files of the folder may hold steps after `step`, logged by a
    /// process that died before its next checkpoint: a session start at `step + 1` has
    /// TensorBoard drop them (PyTorch's `SummaryWriter(purge_step=...)`), so a resumed run
    /// shows one curve.
    pub fn create(dir: &Path, step: u64) -> Result<Self> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let name = format!(
            "events.out.tfevents.{}.{}.{}",
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            host.trim(),
            std::process::id()
        );
        let path = dir.join(name);
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut writer = Self { path, out: BufWriter::new(file) };
        let mut event = event_header(0);
        bytes_field(&mut event, 3, b"brain.Event:2");
        writer.record(&event)?;
        // session_log (field 7): a SessionLog whose status (field 1) is START (1).
        let mut start = event_header(step + 1);
        let mut session_log = Vec::new();
        varint_field(&mut session_log, 1, 1);
        bytes_field(&mut start, 7, &session_log);
        writer.record(&start)?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        let mut value_msg = Vec::new();
        bytes_field(&mut value_msg, 1, tag.as_bytes());
        // simple_value: field 2, a 32-bit float.
        key(&mut value_msg, 2, 5);
        value_msg.extend_from_slice(&(value as f32).to_le_bytes());
        self.summary(step, &value_msg)
    }

    /// An image already encoded as PNG.
    pub fn image(&mut self, tag: &str, step: u64, png: &[u8], width: u32, height: u32) -> Result<()> {
        let mut image = Vec::new();
        varint_field(&mut image, 1, height as u64);
        varint_field(&mut image, 2, width as u64);
        varint_field(&mut image, 3, 3); // RGB
        bytes_field(&mut image, 4, png);
        let mut value_msg = Vec::new();
        bytes_field(&mut value_msg, 1, tag.as_bytes());
        bytes_field(&mut value_msg, 4, &image);
        self.summary(step, &value_msg)
    }

    /// Makes what was written visible to readers.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().with_context(|| format!("writing {}", self.path.display()))
    }

    fn summary(&mut self, step: u64, value_msg: &[u8]) -> Result<()> {
        let mut summary = Vec::new();
        bytes_field(&mut summary, 1, value_msg);
        let mut event = event_header(step);
        bytes_field(&mut event, 5, &summary);
        self.record(&event)
    }

    /// One TFRecord: u64 length, its masked CRC, the data, the data's masked CRC.
    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut framed = Vec::with_capacity(data.len() + 16);
        framed.extend_from_slice(&len);
        framed.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        framed.extend_from_slice(data);
        framed.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.out.write_all(&framed).with_context(|| format!("writing {}", self.path.display()))
    }
}

/// An `Event` with its wall_time (field 1, double) and step (field 2).
fn event_header(step: u64) -> Vec<u8> {
    let mut event = Vec::new();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    key(&mut event, 1, 1);
    event.extend_from_slice(&now.to_le_bytes());
    varint_field(&mut event, 2, step);
    event
}

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn key(buf: &mut Vec<u8>, field: u32, wire_type: u8) {
    varint(buf, ((field as u64) << 3) | wire_type as u64);
}

fn varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    key(buf, field, 0);
    varint(buf, v);
}

fn bytes_field(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(buf, field, 2);
    varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// CRC-32C (Castagnoli), bitwise-reflected table form.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |c, &b| TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8))
}

/// TFRecord's masking, so CRCs of data that holds CRCs stay well distributed.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let mut buf = Vec::new();
        varint(&mut buf, 300);
        assert_eq!(buf, [0xAC, 0x02]);
    }
}
