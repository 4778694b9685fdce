"""The filesystem side of a store: URLs, what may be replaced, stale temporary files, and the reader pool."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import fsspec
import fsspec.implementations.local

from chorus.errors import ChorusError

MANIFEST_KEY = "chorus"
CREATING_KEY = "chorus_creating"  # set on a store's root group at creation, before its manifest exists


def split_url(url: str) -> tuple[str, str]:
    if "://" not in url:
        return "file", os.path.abspath(os.path.expanduser(url))
    protocol, rest = url.split("://", 1)
    if not protocol or not rest.strip("/"):
        raise ChorusError(f"malformed store URL '{url}'; expected a path or PROTOCOL://BUCKET/PATH")
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as e:
        raise ChorusError(f"cannot use store URL '{url}': {e}".splitlines()[0]) from None
    if protocol == "file":
        return "file", os.path.abspath(rest if rest.startswith("/") else "/" + rest)
    return protocol, url


def check_replaceable(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """Refuse to delete ``root`` unless it is a chorus store (finished or being created) or an empty folder."""
    refuse = ChorusError(f"'{url}' exists and is not a chorus store; refusing to replace it: "
                         "choose another --out, or remove it yourself if it is really meant to go")
    if not fs.isdir(root):
        raise refuse
    if not fs.exists(f"{root}/zarr.json"):
        if fs.ls(root, detail=False):
            raise refuse
        return
    try:
        with fs.open(f"{root}/zarr.json", "rb") as f:
            attrs = json.loads(f.read()).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        raise refuse from None
    if MANIFEST_KEY not in attrs and CREATING_KEY not in attrs:
        raise refuse


def clean_stale_tmp(fs: fsspec.AbstractFileSystem, paths: Iterable[str]) -> None:
    """Remove ``*.tmp-PID-…`` files left by killed processes of this host (local files only; a live
    process's temporary file is kept)."""
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return
    for p in paths:
        try:
            pid = int(p.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        except PermissionError:
            pass


@functools.lru_cache(maxsize=1)
def _pool_of(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="chorus-read")


def reader_pool() -> ThreadPoolExecutor:
    """One reader pool per process: a forked DataLoader worker must not inherit its parent's (threadless) pool."""
    return _pool_of(os.getpid())
