"""Key-level I/O of a row store: chunk objects, small atomic files, pre-image copies, deletions.

Two implementations with one interface: :class:`LocalFiles` (plain files of a local zarr store: a
pre-image is a hard link, a small file is replaced atomically by rename, ``durable=True`` fsyncs files
and folders) and :class:`StoreKeys` (any other zarr store, through its key API; an object store's PUT
is atomic). Every mutation announces itself to :func:`picstream.iopoints.point` first, and an OSError
always names the path it was about.
"""
from __future__ import annotations

import os

import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ..iopoints import about, fsync_path, replace_file, write_all


class StoreKeys:
    """Objects of any zarr store under the key ``prefix`` (a group's path), through the store's own
    API (no fsync: durability is the underlying store's)."""

    def __init__(self, store, prefix: str = "", durable: bool = False):
        self.store, self.prefix, self.durable = store, prefix, durable

    def _get(self, key: str):
        return sync(self.store.get(self.prefix + key, prototype=default_buffer_prototype()))

    def read_into(self, key: str, out: np.ndarray) -> bool:
        """Fill ``out`` from the object at ``key``; False (``out`` untouched) when it is absent."""
        buf = self._get(key)
        if buf is None:
            return False
        data = np.frombuffer(buf.to_bytes(), np.uint8)
        if data.size != out.nbytes:
            raise OSError(f"chunk {key} has {data.size} bytes, expected {out.nbytes}")
        out.reshape(-1).view(np.uint8)[:] = data
        return True

    def get(self, key: str) -> bytes | None:
        buf = self._get(key)
        return None if buf is None else buf.to_bytes()

    def exists(self, key: str) -> bool:
        return sync(self.store.exists(self.prefix + key))

    def names(self, prefix: str) -> list[str]:
        """The names directly under the folder ``prefix`` (ending in '/')."""
        full = self.prefix + prefix

        async def collect():
            return [k async for k in self.store.list_prefix(full)]
        return sorted({k[len(full):].split("/")[0] for k in sync(collect())})

    def _set(self, key: str, data: bytes) -> None:
        with about(self.prefix + key, "set"):
            sync(self.store.set(self.prefix + key, default_buffer_prototype().buffer.from_bytes(data)))

    def write(self, key: str, data: np.ndarray) -> None:
        self._set(key, np.ascontiguousarray(data).tobytes())

    def put(self, key: str, data: bytes) -> None:
        """Replace the small object ``key`` whole."""
        self._set(key, data)

    def snapshot(self, src: str, dst: str) -> None:
        """Make ``dst`` what ``src`` is now (an absent ``src`` leaves ``dst`` absent)."""
        buf = self._get(src)
        if buf is None:
            self.delete(dst)
        else:
            self._set(dst, buf.to_bytes())

    def delete(self, key: str) -> None:
        if self.exists(key):
            with about(self.prefix + key, "delete"):
                sync(self.store.delete(self.prefix + key))

    def remove_folder(self, prefix: str, first: tuple[str, ...] = ()) -> None:
        """Delete every object under ``prefix``: the names in ``first`` before all others."""
        names = self.names(prefix)
        for name in [n for n in first if n in names] + [n for n in names if n not in first]:
            self.delete(prefix + name)

    def sync_written(self) -> None:
        """Nothing to do: durability is the underlying store's."""


class LocalFiles(StoreKeys):
    """Files of a local zarr store. A chunk is written in place when its file has no other link and
    replaced otherwise (a pre-image link keeps its bytes); a small file is written to a temporary name
    and renamed over the old one. With ``durable``, every folder created is fsynced into its parent,
    small files and their folders are fsynced before they count, and ``sync_written`` fsyncs every
    chunk file written or restored since the last call, and their folders."""

    def __init__(self, root: str, durable: bool = False):
        super().__init__(None, "", durable)
        self.root = str(root)
        self._written: set[str] = set()

    def path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def read_into(self, key: str, out: np.ndarray) -> bool:
        path = self.path(key)
        try:
            with about(path), open(path, "rb", buffering=0) as f:
                if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes or f.read(1):
                    raise OSError(f"chunk file {path} has the wrong size (torn write?)")
        except FileNotFoundError:
            return False
        return True

    def get(self, key: str) -> bytes | None:
        try:
            with open(self.path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return os.path.lexists(self.path(key))

    def names(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(prefix)))
        except FileNotFoundError:
            return []

    def _makedirs(self, folder: str) -> None:
        missing = []
        while not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for path in reversed(missing):
            with about(path, "mkdir"):
                try:
                    os.mkdir(path)
                except FileExistsError:  # another rank's part of a shared store made it meanwhile
                    if not os.path.isdir(path):
                        raise
                    continue
                if self.durable:
                    fsync_path(os.path.dirname(path))

    def _track(self, path: str) -> None:
        if self.durable:
            self._written.add(path)

    def _unlink(self, path: str) -> None:
        with about(path, "unlink"):
            os.unlink(path)

    def write(self, key: str, data: np.ndarray) -> None:
        path, view = self.path(key), memoryview(np.ascontiguousarray(data)).cast("B")
        with about(path):
            try:
                f = open(path, "r+b", buffering=0)
            except FileNotFoundError:
                f = None
            if f is not None:
                with f:
                    st = os.fstat(f.fileno())
                    if st.st_nlink == 1 and st.st_size == len(view):
                        with about(path, "write"):
                            write_all(f, view)
                        self._track(path)
                        return
                self._unlink(path)
            self._makedirs(os.path.dirname(path))
            with about(path, "create"), open(path, "xb", buffering=0) as f:
                write_all(f, view)
            self._track(path)

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        self._makedirs(os.path.dirname(path))
        replace_file(path, data, self.durable)

    def snapshot(self, src: str, dst: str) -> None:
        s, d = self.path(src), self.path(dst)
        if os.path.lexists(d):
            self._unlink(d)
        if not os.path.exists(s):
            return
        self._makedirs(os.path.dirname(d))
        with about(d, "link"):
            os.link(s, d)
        self._track(d)

    def delete(self, key: str) -> None:
        path = self.path(key)
        if os.path.lexists(path):
            self._unlink(path)

    def remove_folder(self, prefix: str, first: tuple[str, ...] = ()) -> None:
        super().remove_folder(prefix, first)
        folder = self.path(prefix)
        if os.path.isdir(folder):
            with about(folder, "rmdir"):
                os.rmdir(folder)

    def sync_written(self) -> None:
        if self.durable:
            for path in self._written:
                if os.path.exists(path):
                    with about(path):
                        fsync_path(path)
            for folder in {os.path.dirname(p) for p in self._written}:
                if os.path.isdir(folder):
                    with about(folder):
                        fsync_path(folder)
        self._written.clear()
