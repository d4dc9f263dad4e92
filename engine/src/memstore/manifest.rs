//! Manifests: an image's slots, written full or as a delta against the parent's manifest
//! (layout in [`super::format`]).

use super::error::{Error, Result};
use super::format::{self, Cursor, Id, Slot, MANIFEST_MAGIC, MANIFEST_VERSION, MAX_CHAIN};

/// An image's slots and what identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Image {
    pub(crate) id: Id,
    pub(crate) bytes: u64,
    pub(crate) slots: Vec<Slot>,
}

impl Image {
    /// Builds an image from its slots, computing its id.
    pub(crate) fn new(slots: Vec<Slot>) -> Image {
        let bytes = slots.iter().map(|s| u64::from(s.len())).sum();
        Image {
            id: image_id(bytes, &slots),
            bytes,
            slots,
        }
    }
}

/// The image id of `slots` (see the format documentation).
pub(crate) fn image_id(bytes: u64, slots: &[Slot]) -> Id {
    let mut h = blake3::Hasher::new();
    h.update(b"domsnap image v2");
    h.update(&bytes.to_le_bytes());
    let mut buf = Vec::with_capacity(36 * 1024);
    for part in slots.chunks(1024) {
        buf.clear();
        for s in part {
            buf.extend_from_slice(&s.len().to_le_bytes());
            match s {
                Slot::Zero(_) => buf.extend_from_slice(&[0u8; 32]),
                Slot::Chunk { id, .. } => buf.extend_from_slice(id),
            }
        }
        h.update(&buf);
    }
    *h.finalize().as_bytes()
}

/// A manifest as stored.
#[derive(Debug, Clone)]
pub(crate) struct Manifest {
    pub(crate) id: Id,
    pub(crate) bytes: u64,
    pub(crate) slots: u64,
    pub(crate) depth: u32,
    pub(crate) parent: Option<String>,
    pub(crate) packs: Vec<Id>,
    pub(crate) body: Body,
}

/// A manifest's entries.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    /// Every slot.
    Full(Vec<Slot>),
    /// The slots that differ from the parent's, by index.
    Delta(Vec<(u64, Slot)>),
}

/// What the parent of a new manifest looks like, for the choice of full or delta.
#[derive(Debug)]
pub(crate) struct ParentRef<'a> {
    pub(crate) object: String,
    pub(crate) depth: u32,
    pub(crate) slots: &'a [Slot],
}

/// Encodes `image` as a manifest: a delta against `parent` when one is given, the chain is
/// short enough and the delta is small; full otherwise. `packs` names the packs of its
/// new chunks; a full manifest also names `chain_packs` (those its parent's chain named).
pub(crate) fn encode(
    image: &Image,
    op: u64,
    parent: Option<&ParentRef<'_>>,
    packs: &[Id],
    chain_packs: &[Id],
) -> Vec<u8> {
    let delta = parent.and_then(|p| {
        if p.depth + 1 > MAX_CHAIN {
            return None;
        }
        let mut changes = Vec::new();
        for (i, slot) in image.slots.iter().enumerate() {
            if p.slots.get(i) != Some(slot) {
                changes.push((i as u64, *slot));
                if changes.len() > image.slots.len() / 4 + 16 {
                    return None;
                }
            }
        }
        Some((p, changes))
    });
    let mut out = Vec::new();
    out.extend_from_slice(MANIFEST_MAGIC);
    out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
    out.extend_from_slice(&image.id);
    out.extend_from_slice(&image.bytes.to_le_bytes());
    out.extend_from_slice(&(image.slots.len() as u64).to_le_bytes());
    out.extend_from_slice(&op.to_le_bytes());
    let (depth, parent_name) = match &delta {
        Some((p, _)) => (p.depth + 1, p.object.as_str()),
        None => (0, ""),
    };
    out.extend_from_slice(&depth.to_le_bytes());
    out.extend_from_slice(&(parent_name.len() as u16).to_le_bytes());
    out.extend_from_slice(parent_name.as_bytes());
    let mut listed: Vec<Id> = packs.to_vec();
    if delta.is_none() {
        listed.extend_from_slice(chain_packs);
    }
    listed.sort();
    listed.dedup();
    out.extend_from_slice(&(listed.len() as u32).to_le_bytes());
    for p in &listed {
        out.extend_from_slice(p);
    }
    match &delta {
        Some((_, changes)) => {
            out.extend_from_slice(&(changes.len() as u64).to_le_bytes());
            for (i, slot) in changes {
                out.extend_from_slice(&i.to_le_bytes());
                put_run(&mut out, slot, 1);
            }
        }
        None => {
            let runs = runs(&image.slots);
            out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
            for (slot, n) in runs {
                put_run(&mut out, &slot, n);
            }
        }
    }
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    out
}

/// Slots with consecutive equal zero slots merged: (slot, count).
fn runs(slots: &[Slot]) -> Vec<(Slot, u32)> {
    let mut out: Vec<(Slot, u32)> = Vec::new();
    for s in slots {
        match (out.last_mut(), s) {
            (Some((Slot::Zero(a), n)), Slot::Zero(b)) if a == b && *n < u32::MAX => *n += 1,
            _ => out.push((*s, 1)),
        }
    }
    out
}

fn put_run(out: &mut Vec<u8>, slot: &Slot, n: u32) {
    match slot {
        Slot::Zero(len) => {
            out.push(0);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
        Slot::Chunk { id, len } => {
            out.push(1);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(id);
        }
    }
}

/// Decodes and checks a manifest read from object `object`.
pub(crate) fn decode(object: &str, data: &[u8]) -> Result<Manifest> {
    let bad = |why: &str| Error::BadManifest {
        object: object.to_string(),
        why: why.to_string(),
    };
    if data.len() < 4 + 4 + 32 + 32 {
        return Err(bad("too short"));
    }
    let (body, hash) = data.split_at(data.len() - 32);
    if blake3::hash(body).as_bytes() != hash {
        return Err(bad("its checksum does not match (damaged or truncated)"));
    }
    let mut c = Cursor::new(body);
    if c.take(4) != Some(&MANIFEST_MAGIC[..]) {
        return Err(bad("bad magic"));
    }
    let version = c.u32().ok_or_else(|| bad("truncated"))?;
    if version != MANIFEST_VERSION {
        return Err(bad(&format!("unknown version {version}")));
    }
    let short = || bad("truncated");
    let id = c.id().ok_or_else(short)?;
    let bytes = c.u64().ok_or_else(short)?;
    let slots = c.u64().ok_or_else(short)?;
    let _op = c.u64().ok_or_else(short)?;
    let depth = c.u32().ok_or_else(short)?;
    let plen = c.u16().ok_or_else(short)? as usize;
    let parent = c.take(plen).ok_or_else(short)?;
    let parent = std::str::from_utf8(parent).map_err(|_| bad("parent name is not UTF-8"))?;
    let parent = (!parent.is_empty()).then(|| parent.to_string());
    if parent.is_some() != (depth > 0) || depth > MAX_CHAIN {
        return Err(bad("chain depth and parent disagree"));
    }
    let k = c.u32().ok_or_else(short)? as usize;
    if k.saturating_mul(32) > c.left() {
        return Err(short());
    }
    let packs = (0..k).map(|_| c.id().unwrap_or_default()).collect();
    let e = c.u64().ok_or_else(short)?;
    // Each entry takes at least 9 bytes: no allocation beyond what the data can hold.
    if e.saturating_mul(9) > c.left() as u64 || slots > bytes.max(1) {
        return Err(bad("more entries or slots than it can hold"));
    }
    let run = |c: &mut Cursor<'_>| -> Option<(Slot, u32)> {
        match c.u8()? {
            0 => {
                let len = c.u32()?;
                Some((Slot::Zero(len), c.u32()?))
            }
            1 => {
                let len = c.u32()?;
                Some((Slot::Chunk { len, id: c.id()? }, 1))
            }
            _ => None,
        }
    };
    let body = if parent.is_none() {
        let mut out = Vec::with_capacity(slots.min(1 << 24) as usize);
        for _ in 0..e {
            let (slot, n) = run(&mut c).ok_or_else(|| bad("bad entry"))?;
            if out.len() as u64 + u64::from(n) > slots {
                return Err(bad("more slots than its header says"));
            }
            out.extend(std::iter::repeat_n(slot, n as usize));
        }
        if out.len() as u64 != slots {
            return Err(bad("fewer slots than its header says"));
        }
        Body::Full(out)
    } else {
        let mut out = Vec::with_capacity(e as usize);
        let mut last = None;
        for _ in 0..e {
            let i = c.u64().ok_or_else(short)?;
            let (slot, n) = run(&mut c).ok_or_else(|| bad("bad entry"))?;
            if n != 1 || i >= slots || last.is_some_and(|l| i <= l) {
                return Err(bad("delta entries out of order or out of range"));
            }
            last = Some(i);
            out.push((i, slot));
        }
        Body::Delta(out)
    };
    if c.left() != 0 {
        return Err(bad("trailing bytes"));
    }
    Ok(Manifest {
        id,
        bytes,
        slots,
        depth,
        parent,
        packs,
        body,
    })
}

/// Reads manifest `object` and its chain, and returns the image with every pack name any
/// manifest of the chain lists, and the chain's depth. Checks the image id.
pub(crate) fn load(store: &dyn store::ObjectStore, object: &str) -> Result<(Image, Vec<Id>, u32)> {
    let mut chain = Vec::new();
    let mut next = Some(object.to_string());
    while let Some(name) = next {
        if chain.len() > MAX_CHAIN as usize {
            return Err(Error::BadManifest {
                object: object.to_string(),
                why: "its chain is longer than allowed (a loop?)".into(),
            });
        }
        let data = store
            .get(&name)?
            .ok_or_else(|| Error::MissingManifest(name.clone()))?;
        let m = decode(&name, &data)?;
        next = m.parent.clone();
        chain.push((name, m));
    }
    let depth = chain.first().map(|(_, m)| m.depth).unwrap_or(0);
    let mut packs = Vec::new();
    let mut slots: Vec<Slot> = Vec::new();
    for (name, m) in chain.into_iter().rev() {
        packs.extend_from_slice(&m.packs);
        match m.body {
            Body::Full(s) => slots = s,
            Body::Delta(changes) => {
                let n = m.slots as usize;
                let mut filled = vec![false; n.saturating_sub(slots.len())];
                slots.resize(n, Slot::Zero(0));
                for (i, slot) in changes {
                    let i = i as usize;
                    slots[i] = slot;
                    if let Some(f) = i
                        .checked_sub(n - filled.len())
                        .and_then(|j| filled.get_mut(j))
                    {
                        *f = true;
                    }
                }
                if filled.iter().any(|f| !f) {
                    return Err(Error::BadManifest {
                        object: name,
                        why: "a delta leaves new slots undefined".into(),
                    });
                }
            }
        }
        let image = Image::new(std::mem::take(&mut slots));
        if image.id != m.id || image.bytes != m.bytes {
            return Err(Error::BadManifest {
                object: name,
                why: format!(
                    "its slots make image {} of {} bytes, it says {} of {}",
                    format::hex(&image.id),
                    image.bytes,
                    format::hex(&m.id),
                    m.bytes
                ),
            });
        }
        slots = image.slots;
    }
    let image = Image::new(slots);
    packs.sort();
    packs.dedup();
    Ok((image, packs, depth))
}
