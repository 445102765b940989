"""Keep the format specification in docs/ honest where a machine can check it.

Every value is taken from the code (imported, or read from the source with ``ast``
where importing would pull in the server or the runtime); nothing is written here a
second time. What is checked:

* constants tables: each row `` `isrsync.module.NAME` `` (or ``sneakernet.``) | `` `value` `` equals the
  constant in the code; every magic, version, flag, section kind, size and limit
  defined in a format module has such a row, and every magic appears as hex;
* byte tables: a table marked ``<!-- struct: NAME -->`` matches that
  ``struct.Struct`` field by field; ``<!-- record: NAME -->`` adds up to that size;
  every Struct of the format modules has a marked table; in every byte table the
  offsets are contiguous and the sizes match the types;
* the HTTP status table, the HTTP routes and the control commands equal the code's;
* the worked examples are what the encoder, the pack writer and the medium format
  (sneakernet.format) produce;
* docs/README.md links every document.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import io
import itertools
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uuid

import pytest

from isrsync import chunk, pack
from isrsync.store import wire
from sneakernet import format as medium
from sneakernet import seedfmt

DOCS = Path(__file__).resolve().parents[2] / "docs"
DOC_FILES = ["README.md", "chunk.md", "pack.md", "manifest.md", "keys.md", "medium.md", "cache.md", "http.md",
             "control.md", "locktoken.md", "seed.md", "mdns.md", "direct.md"]
FORMAT_MODULES = [
    "isrsync.chunk",
    "isrsync.pack",
    "isrsync.manifest",
    "isrsync.keys",
    "isrsync.locktoken",
    "isrsync.site.cache",
    "isrsync.site.state",
    "isrsync.store.wire",
    "sneakernet.format",
    "sneakernet.seedfmt",
    "isrsync.swarm.announce",
    "isrsync.swarm.directfmt",
]
# Module-level constants a reader of the formats needs: they must be in a constants table.
REQUIRED = re.compile(r"MAGIC|(^|_)(VERSION|FORMAT)$|^_?(FLAG|S)_[A-Z0-9_]+$|_SIZE$|^_?(MAX|MIN|DEFAULT)_|LEVEL$|^API$")
# Structs that are integer helpers, not layouts (the commit framing's u32 and u64).
NOT_LAYOUTS = {"isrsync.store.wire._U32", "isrsync.store.wire._U64"}
STRUCT_TYPES = {"B": "u8", "H": "u16 LE", "I": "u32 LE", "Q": "u64 LE", "q": "i64 LE"}
TYPE_SIZES = {"u8": 1, "u16 LE": 2, "u32 LE": 4, "u64 LE": 8, "i64 LE": 8}


# -- reading the Markdown -------------------------------------------------------------


@dataclass
class Table:
    doc: str
    line: int
    marker: tuple[str, str] | None
    header: list[str]
    rows: list[list[str]]

    def where(self) -> str:
        return f"docs/{self.doc}:{self.line}"


_MARKER = re.compile(r"^<!--\s*([\w-]+):\s*(.+?)\s*-->$")
_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip()[1:-1].split("|")]


def _text(doc: str) -> str:
    return (DOCS / doc).read_text(encoding="utf-8")


def _tables(doc: str) -> list[Table]:
    out: list[Table] = []
    marker: tuple[str, str] | None = None
    current: Table | None = None
    in_code = False
    for n, line in enumerate(_text(doc).splitlines(), 1):
        s = line.strip()
        if s.startswith("```"):
            in_code = not in_code
            current = None
            continue
        if in_code:
            continue
        if s.startswith("|") and s.endswith("|"):
            if current is None:
                current = Table(doc, n, marker, [c.lower() for c in _cells(s)], [])
                marker = None
                out.append(current)
            elif not _SEPARATOR.match(s):
                row = _cells(s)
                width = len(current.header)
                assert len(row) == width, f"docs/{doc}:{n}: {len(row)} cells, the header has {width}"
                current.rows.append(row)
            continue
        current = None
        m = _MARKER.match(s)
        if m:
            marker = (m[1], m[2])
        elif s:
            marker = None
    return out


ALL_TABLES = [t for doc in DOC_FILES for t in _tables(doc)]


def _code(cell: str) -> str | None:
    m = re.fullmatch(r"`([^`]+)`", cell.strip())
    return m[1] if m else None


def _int(cell: str) -> int | None:
    return int(cell) if re.fullmatch(r"\d+", cell.strip()) else None


def _marked(kind: str) -> dict[str, Table]:
    return {t.marker[1]: t for t in ALL_TABLES if t.marker and t.marker[0] == kind}


def _resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise LookupError(dotted)


def _defined(modname: str) -> dict[str, Any]:
    """The module-level names a module assigns itself (not the ones it imports)."""
    mod = importlib.import_module(modname)
    tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
    names = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return {n: getattr(mod, n) for n in names}


def _documented_constants() -> list[tuple[str, str, str]]:
    """(name, value as written, where) of every row of every constants table."""
    out = []
    for t in ALL_TABLES:
        if t.header[:2] == ["constant", "value"]:
            out += [(_code(row[0]) or row[0], _code(row[1]) or row[1], t.where()) for row in t.rows]
    return out


DOCUMENTED_ROWS = _documented_constants()
DOCUMENTED = {name for name, _, _ in DOCUMENTED_ROWS}


def _required_constants() -> list[str]:
    out = []
    for modname in FORMAT_MODULES:
        for name, value in _defined(modname).items():
            if isinstance(value, (int, bytes, str)) and not isinstance(value, bool) and REQUIRED.search(name):
                out.append(f"{modname}.{name}")
    return out


def _structs() -> list[str]:
    return [
        f"{m}.{n}" for m in FORMAT_MODULES for n, v in _defined(m).items()
        if isinstance(v, struct.Struct) and f"{m}.{n}" not in NOT_LAYOUTS
    ]


# -- documents --------------------------------------------------------------------------


def test_every_document_exists_and_the_index_links_it() -> None:
    present = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(DOC_FILES) == present, "update DOC_FILES and docs/README.md together"
    index = _text("README.md")
    for doc in DOC_FILES[1:]:
        assert f"]({doc})" in index, f"docs/README.md does not link {doc}"


# -- constants ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "written", "where"), DOCUMENTED_ROWS, ids=[f"{w}:{n}" for n, _, w in DOCUMENTED_ROWS])
def test_documented_constant_matches_code(name: str, written: str, where: str) -> None:
    assert name.startswith(("isrsync.", "sneakernet.")), f"{where}: {name!r} is not a backquoted package.module.NAME"
    value = ast.literal_eval(written)
    actual = _resolve(name)
    assert type(actual) is type(value) and actual == value, (
        f"{where}: {name} is {actual!r} in the code, {value!r} in the docs"
    )


@pytest.mark.parametrize("name", _required_constants())
def test_format_constant_is_documented(name: str) -> None:
    assert name in DOCUMENTED, f"{name} = {_resolve(name)!r} is in no constants table of docs/"


@pytest.mark.parametrize("name", [n for n in _required_constants() if "MAGIC" in n])
def test_magic_appears_as_hex(name: str) -> None:
    magic = _resolve(name)
    spaced = " ".join(f"{b:02x}" for b in magic)
    assert any(f"`{spaced}`" in _text(d) for d in DOC_FILES), f"no byte table of docs/ shows {name} as `{spaced}`"


# -- byte tables ----------------------------------------------------------------------------


def _struct_fields(s: struct.Struct) -> list[tuple[str, int]]:
    assert s.format[0] == "<", f"{s.format!r}: formats are little-endian with no padding"
    fields: list[tuple[str, int]] = []
    for count, code in re.findall(r"(\d*)([a-zA-Z])", s.format[1:]):
        n = int(count) if count else 1
        if code == "s":
            fields.append((f"bytes[{n}]", n))
        else:
            fields += [(STRUCT_TYPES[code], struct.calcsize("<" + code))] * n
    return fields


def _byte_rows(t: Table) -> list[tuple[str, str, str]]:
    assert t.header[:3] == ["offset", "size", "type"], f"{t.where()}: a byte table needs offset | size | type columns"
    return [(r[0], r[1], r[2]) for r in t.rows]


@pytest.mark.parametrize("name", _structs())
def test_struct_has_a_matching_byte_table(name: str) -> None:
    tables = _marked("struct")
    assert name in tables, f"no byte table in docs/ is marked <!-- struct: {name} -->"
    t, s = tables[name], _resolve(name)
    want, pos = [], 0
    for typ, size in _struct_fields(s):
        want.append((str(pos), str(size), typ))
        pos += size
    assert _byte_rows(t) == want, f"{t.where()}: table does not match struct {s.format!r}"
    assert pos == s.size


def test_every_marked_table_names_real_code() -> None:
    for t in ALL_TABLES:
        if t.marker and t.marker[0] in ("struct", "record", "status"):
            _resolve(t.marker[1])


@pytest.mark.parametrize("name", sorted(_marked("record")))
def test_record_table_adds_up(name: str) -> None:
    t = _marked("record")[name]
    pos = 0
    for off, size, _ in _byte_rows(t):
        assert _int(off) == pos and _int(size) is not None, f"{t.where()}: row at {off} is not contiguous"
        pos += int(size)
    assert pos == _resolve(name), f"{t.where()}: rows add up to {pos}, {name} is {_resolve(name)}"


def _type_size(typ: str) -> int | None:
    typ = typ.strip("`")
    if typ in TYPE_SIZES:
        return TYPE_SIZES[typ]
    m = re.fullmatch(r"bytes\[(\d+)\]", typ)
    return int(m[1]) if m else None


BYTE_TABLES = [t for t in ALL_TABLES if t.header[:3] == ["offset", "size", "type"]]


@pytest.mark.parametrize("table", BYTE_TABLES, ids=[t.where() for t in BYTE_TABLES])
def test_byte_table_is_consistent(table: Table) -> None:
    rows = _byte_rows(table)
    for off, size, typ in rows:
        want = _type_size(typ)
        if want is not None:
            assert _int(size) == want, f"{table.where()}: row at {off} is {typ} but {size} bytes"
        else:
            assert typ == "bytes", f"{table.where()}: unknown type {typ!r}"
    for (off, size, _), (nxt, _, _) in itertools.pairwise(rows):
        if _int(off) is not None and _int(size) is not None and _int(nxt) is not None:
            assert _int(off) + _int(size) == _int(nxt), f"{table.where()}: {off} + {size} != {nxt}"


# -- HTTP and control ---------------------------------------------------------------------


def test_status_table_matches_wire() -> None:
    t = _marked("status")["isrsync.store.wire._STATUS"]
    documented = [(_code(r[0]), _int(r[1])) for r in t.rows]
    assert documented == [(cls.__name__, status) for cls, status in wire._STATUS], t.where()


def _source(module: str) -> ast.Module:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))


def _registered_routes() -> set[tuple[str, str]]:
    """(method, path) of every route make_app registers, read from the source (importing
    the server is not needed to know its routes)."""
    make_app = next(
        n for n in ast.walk(_source("isrsync.server.app")) if isinstance(n, ast.FunctionDef) and n.name == "make_app"
    )
    env: dict[str, Any] = {"wire": wire}
    for node in make_app.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.JoinedStr):
            for target in node.targets:
                assert isinstance(target, ast.Name)
                env[target.id] = eval(compile(ast.Expression(node.value), "app.py", "eval"), env)
    routes = set()
    for node in ast.walk(make_app):
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "web"
            and node.func.attr in ("get", "put", "post", "delete", "patch", "head") and node.args
        ):
            path = eval(compile(ast.Expression(node.args[0]), "app.py", "eval"), env)
            routes.add((node.func.attr.upper(), path))
    assert routes, "found no routes in make_app"
    return routes


def test_route_table_matches_the_server() -> None:
    t = _marked("routes")["isrsync.server.app"]
    documented = {(_code(r[0]), _code(r[1])) for r in t.rows}
    code = _registered_routes()
    assert documented == code, (
        f"{t.where()}: only in docs {sorted(documented - code)}, only in code {sorted(code - documented)}"
    )


def test_every_route_is_described() -> None:
    text = _text("http.md")
    for method, path in _registered_routes():
        methods = "PUT or POST" if path.endswith("/packs/{pack}") and method != "GET" else method
        assert f"### {methods} {path}" in text, f"docs/http.md has no section for {method} {path}"


def _control_requests() -> dict[str, dict[str, bool]]:
    """command -> {field: optional?} of the request classes in isrsync/site/control.py."""
    out: dict[str, dict[str, bool]] = {}
    for node in _source("isrsync.site.control").body:
        if not isinstance(node, ast.ClassDef):
            continue
        cmd = None
        fields: dict[str, bool] = {}
        for item in node.body:
            if isinstance(item, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "cmd" for t in item.targets):
                cmd = ast.literal_eval(item.value)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                fields[item.target.id] = item.value is not None
        if cmd is not None:
            out[cmd] = fields
    assert out, "found no control requests"
    return out


def test_control_table_matches_the_code() -> None:
    t = _marked("control")["isrsync.site.control"]
    documented = {}
    for row in t.rows:
        names = re.findall(r"`([a-z_]+)`", row[1])
        documented[_code(row[0])] = {n: "optional" in row[1] for n in names}
    assert documented == _control_requests(), f"{t.where()}: control commands or fields differ from the code"


# -- worked examples --------------------------------------------------------------------------


def _example(doc: str, name: str) -> list[str]:
    lines = _text(doc).splitlines()
    start = lines.index(f"<!-- example: {name} -->")
    assert lines[start + 1].startswith("```"), f"docs/{doc}: the example {name} is not a code block"
    end = lines.index("```", start + 2)
    return lines[start + 2 : end]


def _chunk_example() -> tuple[bytes, chunk.Encoded]:
    fields = dict(line.split(None, 1) for line in _example("chunk.md", "chunk"))
    secret, plain = bytes.fromhex(fields["secret"]), bytes.fromhex(fields["plaintext"])
    enc = chunk.encode(plain, secret)
    assert fields["key"].strip() == enc.ref.key.hex()
    assert int(fields["flags"], 16) == enc.ref.flags
    assert fields["ciphertext"].strip() == enc.data.hex()
    assert fields["tag"].strip() == enc.tag.hex()
    assert chunk.decode(enc.ref, enc.data, len(plain)) == plain
    return plain, enc


def test_chunk_example() -> None:
    _chunk_example()


def test_pack_example() -> None:
    _, enc = _chunk_example()
    out = io.BytesIO()
    writer = pack.PackWriter(out)
    writer.add(enc.tag, enc.data)
    info = writer.finish()
    raw = out.getvalue()
    pos, dump = 0, b""
    for line in _example("pack.md", "pack"):
        offset, *words = line.split("#", 1)[0].split()
        assert int(offset) == pos, f"docs/pack.md: example line at {offset} should be at {pos}"
        data = bytes.fromhex("".join(words))
        dump += data
        pos += len(data)
    assert dump == raw
    m = re.search(r"pack id: `([0-9a-f]{64})`\s*\((\d+) bytes\)", _text("pack.md"))
    assert m and m[1] == info.pack_id.hex() and int(m[2]) == info.size == len(raw)
    assert pack.verify_stream(io.BytesIO(raw), info.pack_id).entries == info.entries


def _dump(doc: str, name: str) -> bytes:
    """The bytes of a hex-dump example (``offset  hex words  # comment`` lines), offsets checked."""
    pos, dump = 0, b""
    for line in _example(doc, name):
        offset, *words = line.split("#", 1)[0].split()
        assert int(offset) == pos, f"docs/{doc}: example line at {offset} should be at {pos}"
        data = bytes.fromhex("".join(words))
        dump += data
        pos += len(data)
    return dump


MEDIUM_ID = uuid.UUID("00112233-4455-4677-8899-aabbccddeeff")
CREATED = 1_700_000_000_000_000_000


def test_medium_header_example() -> None:
    header = medium.MediumHeader(MEDIUM_ID, "demo", CREATED)
    raw = _dump("medium.md", "medium-header")
    assert raw == medium.encode_header(header)
    assert medium.decode_header(raw) == header
    assert f"`{MEDIUM_ID}`" in _text("medium.md")


def test_medium_index_example() -> None:
    _, enc = _chunk_example()
    out = io.BytesIO()
    writer = pack.PackWriter(out)
    writer.add(enc.tag, enc.data)
    info = writer.finish()
    (entry,) = info.entries
    index = medium.Index(
        MEDIUM_ID, 1, CREATED,
        (medium.FileRecord(medium.pack_path(info.pack_id), info.size, CREATED, medium.FileKind.PACK),),
        medium.EntryTable.build([medium.IndexEntry(enc.tag, 0, entry.offset, entry.length)]),
    )
    raw = _dump("medium.md", "medium-index")
    assert raw == medium.encode_index(index)
    assert f"({len(raw)} bytes.)" in _text("medium.md")
    back = medium.decode_index(raw)
    assert back.find(enc.tag) == medium.IndexEntry(enc.tag, 0, 52, len(enc.data))


def test_seed_index_example() -> None:
    plain, enc = _chunk_example()
    secret = bytes.fromhex(dict(line.split(None, 1) for line in _example("chunk.md", "chunk"))["secret"])
    index = seedfmt.build(seedfmt.ImageKind.RAW, file_size=len(plain), mtime_ns=CREATED, virtual_size=len(plain),
                          secret_fingerprint=seedfmt.fingerprint(secret), path="/img/base.raw",
                          extents=[seedfmt.Extent(0, len(plain), 0)], rows=[(enc.tag, 0)],
                          created_ns=CREATED + 5_000_000_000)
    raw = _dump("seed.md", "seed-index")
    assert raw == seedfmt.encode(index)
    assert seedfmt.decode(raw) == index
    assert f"({len(raw)} bytes.)" in _text("seed.md")
