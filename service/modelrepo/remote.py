"""Model repositories in object storage (s3://, gs://, az://), mirrored into a local cache folder.

`sync(url, cache_dir)` lists the bucket prefix, compares every model's objects (key, size, ETag or
modification time) with what was downloaded last time (a manifest in the cache), downloads changed models
into a hidden temporary folder and renames it into place, and removes models gone from the bucket. The
server then loads and polls the cache exactly like a local repository (service/repository.py), so a remote
model goes through the same load, reload and unload path as a local one.

Filesystems come from fsspec's implementations (s3fs, gcsfs, adlfs); credentials from the usual environment
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL[_S3], GOOGLE_APPLICATION_CREDENTIALS,
AZURE_STORAGE_CONNECTION_STRING, ...), read by those libraries themselves.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from service.errors import InvalidInput, ModelLoadError
from service.modelrepo.layout import check_model_name, contained

log = logging.getLogger("modelserve.repository")

# URL scheme -> (fsspec implementation package, modelserve extra that installs it).
SCHEMES: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"),
    "abfs": ("adlfs", "azure"),
    "abfss": ("adlfs", "azure"),
}
MANIFEST = ".remote-manifest.json"
# What identifies one object's content: size plus the first of these listing fields that is present.
_VERSION_FIELDS = ("ETag", "etag", "md5Hash", "generation", "LastModified", "last_modified", "mtime", "updated")

Listing = dict[str, dict[str, list]]  # model name -> {key relative to the model folder: [size, version tag]}


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether a `--model-repository` value is a URL (scheme://...) rather than a local path."""
    return isinstance(location, str) and "://" in location


def check_url(url: str) -> str:
    """`url` if it names a supported object store and a bucket; ValueError saying what is expected otherwise."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SCHEMES:
        raise ValueError(f"model repository URL {url!r}: unsupported scheme {scheme!r}; expected a local path or "
                         f"a URL with one of {', '.join(s + '://' for s in SCHEMES)}")
    if not rest.strip("/"):
        raise ValueError(f"model repository URL {url!r} names no bucket; expected {scheme}://bucket[/prefix]")
    return url


def _filesystem(url: str) -> tuple[Any, str]:
    scheme = url.partition("://")[0].lower()
    package, extra = SCHEMES[scheme]
    missing = ModelLoadError(f"{scheme}:// model repositories need {package}: pip install 'modelserve[{extra}]'")
    try:
        # NOTE: imported here: fsspec and its cloud implementations are optional extras of a local-only server.
        from fsspec.core import url_to_fs
    except ImportError as exc:
        raise missing from exc
    try:
        fs, root = url_to_fs(url)
    except ImportError as exc:
        raise missing from exc
    return fs, root.rstrip("/")


def _relative_key(root: str, path: str) -> tuple[str, str] | None:
    """(model name, key inside the model folder) of an object, or None for a key that is not a model file."""
    rel = path[len(root):].lstrip("/") if path.startswith(root) else ""
    parts = rel.split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        return None
    try:
        check_model_name(parts[0])
    except InvalidInput:
        return None
    return parts[0], "/".join(parts[1:])


def _version_tag(info: dict[str, Any]) -> str:
    return next((str(info[f]) for f in _VERSION_FIELDS if info.get(f) is not None), "")


def list_remote(fs: Any, root: str) -> Listing:
    """Every model's objects under `root`: keys with '..', empty components or invalid model names skipped."""
    fs.invalidate_cache()  # NOTE: s3fs/gcsfs cache directory listings; a poll must see the bucket as it is now
    found = fs.find(root, detail=True)  # FileNotFoundError for a missing bucket; an empty prefix is {}
    listing: Listing = {}
    skipped = []
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        where = _relative_key(root, path)
        if where is None:
            skipped.append(path)
            continue
        listing.setdefault(where[0], {})[where[1]] = [int(info.get("size") or 0), _version_tag(info)]
    if skipped:
        log.warning("object storage: ignored %d keys that are not <model>/<file> with a valid model name: %s",
                    len(skipped), skipped[:5])
    return listing


def _read_manifest(cache_dir: Path, url: str) -> Listing:
    try:
        data = json.loads((cache_dir / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data.get("models", {}) if isinstance(data, dict) and data.get("url") == url else {}


def _write_manifest(cache_dir: Path, url: str, listing: Listing) -> None:
    temp = cache_dir / f"{MANIFEST}.{uuid.uuid4().hex}"
    temp.write_text(json.dumps({"url": url, "models": listing}))
    os.replace(temp, cache_dir / MANIFEST)


def _download(fs: Any, *, root: str, name: str, keys: dict[str, list], cache_dir: Path) -> None:
    """Download one model into a hidden folder, then swap it in with renames: a scan never sees half a model."""
    temp = cache_dir / f".sync-{name}-{uuid.uuid4().hex}"
    temp.mkdir()
    try:
        for key in keys:
            local = contained(temp, key, what="object key")
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{name}/{key}", str(local))
        _replace(temp, cache_dir / name)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _replace(new: Path, target: Path) -> None:
    old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def sync(url: str, cache_dir: Path) -> list[str]:
    """Mirror the models under `url` into `cache_dir`; the names of models downloaded, replaced or removed."""
    fs, root = _filesystem(check_url(url))
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        remote = list_remote(fs, root)
    except (OSError, ValueError) as exc:  # unreachable endpoint, bad credentials, no such bucket
        raise ModelLoadError(f"cannot list model repository {url}: {type(exc).__name__}: {exc}") from exc
    cached = _read_manifest(cache_dir, url)
    changed = []
    for name, keys in remote.items():
        if cached.get(name) == keys and (cache_dir / name).is_dir():
            continue
        log.info("object storage: downloading model %s (%d objects) from %s", name, len(keys), url)
        try:
            _download(fs, root=root, name=name, keys=keys, cache_dir=cache_dir)
        except (OSError, InvalidInput) as exc:  # one model's failed download must not stop the others
            log.error("object storage: model %s not downloaded (the next poll retries): %s", name, exc)
            continue
        cached[name] = keys
        changed.append(name)
    for name in [n for n in cached if n not in remote]:
        log.info("object storage: model %s is gone from %s; removing it from the cache", name, url)
        shutil.rmtree(contained(cache_dir, name, what="model"), ignore_errors=True)
        del cached[name]
        changed.append(name)
    _write_manifest(cache_dir, url, cached)
    return sorted(changed)
