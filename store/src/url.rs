//! Choosing a backend by a short location string (a `--store` option, a state's
//! configuration).

use std::path::Path;
use std::sync::Arc;

use crate::{Error, ErrorKind, LocalStore, ObjectStore, Result};

/// Opens the object store `location` names:
///
/// - `local:DIR` or an absolute path: a [`LocalStore`] in that directory;
/// - `rados:POOL` or `rados:POOL/NAMESPACE` (feature `rados`): a pool of the Ceph cluster
///   librados's configuration names (`$CEPH_CONF`, else `/etc/ceph/ceph.conf`), as
///   `client.admin`;
/// - `s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]` (feature `s3`): keys from
///   `DOMSNAP_S3_ACCESS_KEY` and `DOMSNAP_S3_SECRET_KEY` (else `AWS_ACCESS_KEY_ID` and
///   `AWS_SECRET_ACCESS_KEY`), region from `DOMSNAP_S3_REGION` (default `us-east-1`).
///
/// A location that names nothing this build can open is refused with
/// [`ErrorKind::InvalidName`], saying why; nothing is created then.
pub fn open_location(location: &str, read_only: bool) -> Result<Arc<dyn ObjectStore>> {
    let bad = |why: String| Error::new(ErrorKind::InvalidName, "open store", location, why);
    if let Some(dir) = location.strip_prefix("local:") {
        if dir.is_empty() {
            return Err(bad("local: needs a directory".into()));
        }
        return Ok(Arc::new(LocalStore::open(Path::new(dir), read_only)?));
    }
    if location.starts_with('/') {
        return Ok(Arc::new(LocalStore::open(Path::new(location), read_only)?));
    }
    if let Some(rest) = location.strip_prefix("rados:") {
        return rados(rest, read_only).map_err(|e| match e.kind() {
            ErrorKind::InvalidName => bad(e.to_string()),
            _ => e,
        });
    }
    if let Some(rest) = location.strip_prefix("s3:") {
        return s3(rest, read_only).map_err(|e| match e.kind() {
            ErrorKind::InvalidName => bad(e.to_string()),
            _ => e,
        });
    }
    Err(bad(
        "expected local:DIR, an absolute path, rados:POOL[/NAMESPACE] or \
         s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]"
            .into(),
    ))
}

#[cfg(feature = "rados")]
fn rados(rest: &str, read_only: bool) -> Result<Arc<dyn ObjectStore>> {
    let (pool, namespace) = rest.split_once('/').unwrap_or((rest, ""));
    if pool.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidName,
            "open store",
            rest,
            "rados: needs a pool".into(),
        ));
    }
    let config = crate::RadosConfig::new(pool, namespace);
    Ok(Arc::new(crate::RadosStore::open(&config, read_only)?))
}

#[cfg(not(feature = "rados"))]
fn rados(rest: &str, _read_only: bool) -> Result<Arc<dyn ObjectStore>> {
    Err(Error::new(
        ErrorKind::InvalidName,
        "open store",
        rest,
        "this domsnap was built without Ceph RADOS support (feature rados)".into(),
    ))
}

#[cfg(feature = "s3")]
fn s3(rest: &str, read_only: bool) -> Result<Arc<dyn ObjectStore>> {
    let invalid = |why: &str| Error::new(ErrorKind::InvalidName, "open store", rest, why.into());
    let (scheme, after) = rest
        .split_once("://")
        .ok_or_else(|| invalid("s3: needs http(s)://HOST[:PORT]/BUCKET"))?;
    if scheme != "http" && scheme != "https" {
        return Err(invalid("s3: endpoints are http:// or https://"));
    }
    let (host, path) = after
        .split_once('/')
        .ok_or_else(|| invalid("s3: needs a bucket after the host"))?;
    let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
    if host.is_empty() || bucket.is_empty() {
        return Err(invalid("s3: needs a host and a bucket"));
    }
    let var = |a: &str, b: &str| std::env::var(a).or_else(|_| std::env::var(b)).ok();
    let (Some(access_key), Some(secret_key)) = (
        var("DOMSNAP_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
        var("DOMSNAP_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
    ) else {
        return Err(invalid(
            "set DOMSNAP_S3_ACCESS_KEY and DOMSNAP_S3_SECRET_KEY for an s3: store",
        ));
    };
    let config = crate::S3Config {
        endpoint: format!("{scheme}://{host}"),
        bucket: bucket.to_string(),
        prefix: prefix.trim_end_matches('/').to_string(),
        access_key,
        secret_key,
        region: std::env::var("DOMSNAP_S3_REGION").unwrap_or_else(|_| "us-east-1".into()),
        timeout_secs: 30,
    };
    Ok(Arc::new(crate::S3Store::open(&config, read_only)?))
}

#[cfg(not(feature = "s3"))]
fn s3(rest: &str, _read_only: bool) -> Result<Arc<dyn ObjectStore>> {
    Err(Error::new(
        ErrorKind::InvalidName,
        "open store",
        rest,
        "this domsnap was built without S3 support (feature s3)".into(),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn locations_that_name_nothing_are_refused_and_create_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let relative = "some/dir";
        for bad in [
            "",
            relative,
            "local:",
            "rados:",
            "s3:ftp://h/b",
            "s3:http://h",
            "nfs:/x",
        ] {
            let e = open_location(bad, false).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidName, "{bad:?}: {e}");
        }
        assert!(!Path::new(relative).exists());
        let at = dir.path().join("objects");
        let s = open_location(&format!("local:{}", at.display()), false).unwrap();
        assert_eq!(s.kind(), "local");
        assert!(at.is_dir());
    }
}
