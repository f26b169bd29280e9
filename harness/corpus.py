"""Offline long-text corpus: Jane Austen's six novels from Debian's ``r-cran-janeaustenr``.

Install step (Debian/Ubuntu, root)::

    apt-get update && apt-get install -y --no-install-recommends r-cran-janeaustenr

The package stores the novels as an R lazy-load database (``data/Rdata.rdx`` index + ``data/Rdata.rdb``
blobs, each blob a zlib-compressed R serialization in XDR format). This module parses that format itself
(a minimal reader of the R serialization subset used there: character/integer/logical/real vectors,
lists, pairlists, symbols, references), so no R and no extra Python package is needed. The decoded text
is cached as plain UTF-8 under ``$THRIFT_CACHE`` (default ``~/.cache/thrift-attention/janeaustenr``).

``load_novels()`` returns ``{name: text}``; ``load_corpus()`` joins them in a fixed order.
``CorpusUnavailable`` (a RuntimeError) carries a printable reason when the package is not installed.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import zlib
from pathlib import Path

# Where Debian puts the package's data (R's site library); overridable for other layouts.
DEFAULT_PKG_DIRS = (
    "/usr/lib/R/site-library/janeaustenr",
    "/usr/local/lib/R/site-library/janeaustenr",
    "/usr/lib/R/library/janeaustenr",
)
# Fixed order (publication order) so windows are reproducible.
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
INSTALL_HINT = "apt-get update && apt-get install -y --no-install-recommends r-cran-janeaustenr"


class CorpusUnavailable(RuntimeError):
    """The corpus cannot be read here; str(e) says why and how to install it."""


def cache_dir() -> Path:
    root = os.environ.get("THRIFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "thrift-attention")
    return Path(root) / "janeaustenr"


# ---------------------------------------------------------------------------------------------------------
# Minimal R serialization (XDR, format version 2/3) reader.
# ---------------------------------------------------------------------------------------------------------
_NILVALUE, _REFSXP = 254, 255
_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
_NA_INT = -(2 ** 31)


class _RReader:
    def __init__(self, buf: bytes):
        self.b, self.i, self.refs = buf, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def _len(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two 32-bit halves
            hi, lo = self._int(), self._int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        return n

    def read(self):
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization (expected header 'X\\n')")
        self.i = 2
        version = self._int()
        self._int(), self._int()  # writer R version, minimal reader version
        if version == 3:
            n = self._int()
            self.i += n  # skip the native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")
        return self._item()

    def _item(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t == _NILVALUE:
            return None
        if t == _REFSXP:
            idx = flags >> 8 or self._int()
            return self.refs[idx - 1]
        if t == _SYMSXP:
            sym = ("symbol", self._item())
            self.refs.append(sym)
            return sym
        if t == _CHARSXP:
            n = self._int()
            if n == -1:
                return None  # NA_character_
            s = self.b[self.i:self.i + n].decode("utf-8", "replace")
            self.i += n
            return s
        if t == _LISTSXP:  # pairlist: attr?, tag?, car, cdr  -> python dict/list of (tag, value)
            out = []
            while True:
                attr = self._item() if has_attr else None
                tag = self._item() if has_tag else None
                out.append((tag[1] if isinstance(tag, tuple) else tag, self._item()))
                del attr
                nxt = self._int()
                t2 = nxt & 0xFF
                if t2 == _NILVALUE:
                    return out
                if t2 != _LISTSXP:  # dotted tail: push back and read it as an item
                    self.i -= 4
                    out.append((None, self._item()))
                    return out
                has_attr, has_tag = bool(nxt & (1 << 9)), bool(nxt & (1 << 10))
        if t in (_LGLSXP, _INTSXP):
            n = self._len()
            vals = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
            vals = [None if v == _NA_INT else v for v in vals]
        elif t == _REALSXP:
            n = self._len()
            vals = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif t in (_STRSXP, _VECSXP):
            n = self._len()
            vals = [self._item() for _ in range(n)]
        else:
            raise ValueError(f"R serialization type {t} is not supported by this minimal reader")
        if has_attr:
            attrs = dict(self._item())
            names = attrs.get("names")
            if names is not None and t == _VECSXP:
                return dict(zip(names, vals))
        return vals


def _decompress_rdb_blob(blob: bytes, compressed) -> bytes:
    """A lazy-load blob: 4-byte big-endian raw length, then (for types 2/3) a type byte, then the stream."""
    (n,) = struct.unpack_from(">I", blob, 0)
    if compressed in (None, 0, False):
        return blob[4:4 + n]
    if compressed in (1, True):
        return zlib.decompress(blob[4:])
    kind, body = blob[4:5], blob[5:]
    if kind == b"Z":
        return zlib.decompress(body)
    if kind == b"2":
        return bz2.decompress(body)
    if kind == b"X":
        return lzma.decompress(body)
    if kind == b"0":
        return body[:n]
    raise ValueError(f"unknown lazy-load compression type {kind!r}")


def read_lazyload_db(data_dir: str | Path) -> dict:
    """Every object of an R package's ``data/Rdata.{rdx,rdb}`` lazy-load database, by name."""
    data_dir = Path(data_dir)
    index = _RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).read()
    comp = index.get("compressed")
    comp = comp[0] if isinstance(comp, list) else comp
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (off, length) in index["variables"].items():
        blob = rdb[int(off):int(off) + int(length)]
        out[name] = _RReader(_decompress_rdb_blob(blob, comp)).read()
    return out


def find_package_dir() -> Path:
    env = os.environ.get("JANEAUSTENR_DIR")
    for d in ([env] if env else []) + list(DEFAULT_PKG_DIRS):
        if d and (Path(d) / "data" / "Rdata.rdx").exists():
            return Path(d)
    raise CorpusUnavailable(
        "Debian package r-cran-janeaustenr not found (looked in "
        + ", ".join(([env] if env else []) + list(DEFAULT_PKG_DIRS)) + f"); install it with: {INSTALL_HINT}")


def load_novels(refresh: bool = False) -> dict[str, str]:
    """{novel name: full text} (lines joined with newlines), read once and cached as UTF-8 text files."""
    cdir = cache_dir()
    files = {n: cdir / f"{n}.txt" for n in NOVELS}
    if not refresh and all(f.exists() for f in files.values()):
        return {n: f.read_text(encoding="utf-8") for n, f in files.items()}
    objs = read_lazyload_db(find_package_dir() / "data")
    missing = [n for n in NOVELS if n not in objs]
    if missing:
        raise CorpusUnavailable(f"janeaustenr data lacks {missing}; found {sorted(objs)}")
    cdir.mkdir(parents=True, exist_ok=True)
    texts = {}
    for n in NOVELS:
        lines = objs[n]
        texts[n] = "\n".join("" if s is None else s for s in lines)
        tmp = files[n].with_suffix(".tmp")
        tmp.write_text(texts[n], encoding="utf-8")
        tmp.replace(files[n])
    return texts


def load_corpus(refresh: bool = False) -> str:
    """All six novels, joined in publication order, separated by blank lines."""
    novels = load_novels(refresh)
    return "\n\n\n".join(novels[n] for n in NOVELS)


if __name__ == "__main__":
    try:
        nov = load_novels()
    except CorpusUnavailable as e:
        print(f"corpus unavailable: {e}")
        raise SystemExit(1)
    for k, v in nov.items():
        print(f"{k:18s} {len(v):9d} chars  {v[:60]!r}")
    print("cached under", cache_dir())
