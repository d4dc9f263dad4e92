//! The head of an `xl save` stream, where xl keeps the domain's configuration, and its disks
//! set to where they are now.
//!
//! Layout (tools/xl/xl_saverestore.c; integers in the saving host's byte order, which the
//! `byteorder` field shows): 32-byte magic `Xen saved domain, xl format\n \0 \r`,
//! u32 `byteorder` (0x01020304), u32 mandatory flags (bit 0: the configuration is JSON),
//! u32 optional flags, u32 optional data length, then the optional data: u32 configuration
//! length and the configuration (libxl's JSON, NUL-terminated), then the libxl stream.
//!
//! `xl restore` builds the domain from that configuration. Its disk paths are those of the
//! moment of the save, as libxl knew them: an external snapshot taken later (or before, while
//! the domain ran: libxl never learns of it) moved the disk to another image. Restoring
//! therefore rewrites the paths to the images the disks have now; nothing else changes, and a
//! stream whose paths are already right passes byte for byte.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::PathBuf;

use serde_json::Value;

const MAGIC: &[u8; 32] = b"Xen saved domain, xl format\n \0 \r";
const BYTEORDER: u32 = 0x0102_0304;
const FLAG_JSON: u32 = 1;
/// The largest configuration accepted (xl's own limit is far below).
const MAX_CONFIG: u32 = 16 << 20;

/// `source` with the disks of the configuration in its header set to `disks` (target →
/// image). Reads the header up front; a stream that is not an xl stream with a JSON
/// configuration, or names none of these disks, is returned unchanged.
pub(crate) fn with_disks<'a>(
    source: &'a mut dyn Read,
    disks: &BTreeMap<String, PathBuf>,
) -> io::Result<(Box<dyn Read + 'a>, bool)> {
    let mut head = vec![0u8; 48];
    let got = read_full(source, &mut head)?;
    head.truncate(got);
    let unchanged = |head: Vec<u8>, source: &'a mut dyn Read| {
        Ok((
            Box::new(io::Cursor::new(head).chain(source)) as Box<dyn Read>,
            false,
        ))
    };
    if got < 48 || &head[..32] != MAGIC {
        return unchanged(head, source);
    }
    let word = |i: usize| u32::from_ne_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if word(32) != BYTEORDER || word(36) & FLAG_JSON == 0 {
        return unchanged(head, source);
    }
    let optional_len = word(44);
    if !(4..=MAX_CONFIG).contains(&optional_len) {
        return unchanged(head, source);
    }
    let mut optional = vec![0u8; optional_len as usize];
    let got = read_full(source, &mut optional)?;
    let config_len = u32::from_ne_bytes([optional[0], optional[1], optional[2], optional[3]]);
    if got < optional.len() || config_len as usize > optional.len() - 4 {
        head.extend_from_slice(&optional[..got]);
        return unchanged(head, source);
    }
    let (config, rest) = optional[4..].split_at(config_len as usize);
    let text = config.strip_suffix(&[0]).unwrap_or(config);
    let Some(new_config) = rewrite(text, disks) else {
        head.extend_from_slice(&optional);
        return unchanged(head, source);
    };
    let mut config_bytes = new_config.into_bytes();
    config_bytes.push(0);
    let new_optional_len = 4 + config_bytes.len() + rest.len();
    let mut out = head[..44].to_vec();
    out.extend_from_slice(&(new_optional_len as u32).to_ne_bytes());
    out.extend_from_slice(&(config_bytes.len() as u32).to_ne_bytes());
    out.extend_from_slice(&config_bytes);
    out.extend_from_slice(rest);
    Ok((Box::new(io::Cursor::new(out).chain(source)), true))
}

/// The configuration with the disks' `pdev_path` set from `disks`; None if nothing changes
/// (or it is not a JSON object with disks).
fn rewrite(text: &[u8], disks: &BTreeMap<String, PathBuf>) -> Option<String> {
    let mut config: Value = serde_json::from_slice(text).ok()?;
    let mut changed = false;
    for d in config.get_mut("disks")?.as_array_mut()? {
        let Some(vdev) = d.get("vdev").and_then(Value::as_str) else {
            continue;
        };
        let Some(path) = disks.get(vdev) else {
            continue;
        };
        let path = path.to_string_lossy();
        if d.get("pdev_path").and_then(Value::as_str) != Some(&path) {
            d["pdev_path"] = Value::String(path.into_owned());
            changed = true;
        }
    }
    changed.then(|| config.to_string())
}

/// Reads until `buf` is full or the source ends; the bytes read.
fn read_full(source: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match source.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stream(config: &Value, body: &[u8]) -> Vec<u8> {
        let mut c = config.to_string().into_bytes();
        c.push(0);
        let mut s = MAGIC.to_vec();
        for w in [BYTEORDER, 3, 0, 4 + c.len() as u32, c.len() as u32] {
            s.extend_from_slice(&w.to_ne_bytes());
        }
        s.extend_from_slice(&c);
        s.extend_from_slice(body);
        s
    }

    fn run(input: &[u8], disks: &BTreeMap<String, PathBuf>) -> (Vec<u8>, bool) {
        let mut src = input;
        let (mut r, changed) = with_disks(&mut src, disks).expect("header");
        let mut out = Vec::new();
        r.read_to_end(&mut out).expect("read");
        (out, changed)
    }

    #[test]
    fn disks_are_moved_and_everything_else_kept() {
        let config = json!({"c_info": {"name": "d"}, "disks": [
            {"vdev": "xvda", "pdev_path": "/img/a.qcow2", "format": "qcow2"},
            {"vdev": "xvdb", "pdev_path": "/dev/vg/b", "format": "raw"}]});
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let input = stream(&config, &body);
        let disks: BTreeMap<String, PathBuf> = [
            ("xvda".to_string(), PathBuf::from("/img/xvda-7.qcow2")),
            ("xvdb".to_string(), PathBuf::from("/dev/vg/b")),
        ]
        .into();
        let (out, changed) = run(&input, &disks);
        assert!(changed);
        let mut expected = config.clone();
        expected["disks"][0]["pdev_path"] = json!("/img/xvda-7.qcow2");
        assert_eq!(out, stream(&expected, &body));
        // already right: byte for byte
        let (same, changed) = run(&out, &disks);
        assert!(!changed);
        assert_eq!(same, out);
    }

    #[test]
    fn other_streams_pass_unchanged() {
        let disks: BTreeMap<String, PathBuf> = [("xvda".to_string(), PathBuf::from("/x"))].into();
        for input in [
            b"short".to_vec(),
            vec![7u8; 5000],
            {
                // an xl stream whose configuration is not JSON (flag clear)
                let mut s = stream(&json!({"disks": []}), b"rest");
                s[36..40].copy_from_slice(&2u32.to_ne_bytes());
                s
            },
            {
                // a configuration length beyond the optional data
                let mut s = stream(&json!({"disks": []}), b"rest");
                s[48..52].copy_from_slice(&9999u32.to_ne_bytes());
                s
            },
        ] {
            let (out, changed) = run(&input, &disks);
            assert!(!changed);
            assert_eq!(out, input);
        }
    }
}
