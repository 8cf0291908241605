"""The published catalog as types: simplestreams products:1.0 (images.json) and index:1.0
(index.json), one class per level of the format, and its one reader.

Built by the writer (catalog/products.py) and turned into bytes by the one encoder
(catalog/encode.py: a Version's entry is encoded once and kept with it, `Version.derived`);
everything that reads images.json as a client does (list, verify, the mirror's send list, sync
reading an upstream, the tests) reads it here, into these types. The writer never reads back
what it wrote: it keeps its model, and a record of what it listed (catalog/published.py).

The reader is bounded and tolerant: streams/ may have been tampered with (finding 3 of issue 9:
a nested images.json, or a symlink to /dev/zero), so a document is read from a regular file
only (no link followed, no FIFO waited on), at most MAX_CATALOG_BYTES, nested at most
MAX_CATALOG_DEPTH levels, and never crashes nor grows without bound; a field it does not know
is ignored; a field it knows with the wrong type is a ValueError (one
line) naming where. "The images a client sees in a version" is `Version.images(client)`, the
one restatement of shared/simplestreams/products.go (canonical/lxd, lxc/incus): the client's
metadata item pairs with every root item the metadata item has a combined fingerprint for; a
unified item of the client's ftype stands alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, TypeVar, cast, get_args

from lxd_image_server.fsutil import TooLarge, load_json_bounded, read_regular
from lxd_image_server.tree.layout import COMBINED_FIELDS, VM_FTYPES, serial_sort_key
from lxd_image_server.tree.unified import CONTAINER_TYPE as CONTAINER_TYPE
from lxd_image_server.tree.unified import VM_TYPE as VM_TYPE

#: images.json grows with the versions published: 256 MiB is far beyond any real tree
MAX_CATALOG_BYTES = 256 << 20
#: products -> product -> versions -> version -> items -> item -> field is 7 levels
MAX_CATALOG_DEPTH = 32

PRODUCTS_FORMAT = "products:1.0"
IMAGE_DOWNLOADS = "image-downloads"
#: an image's type as clients name it (a unified item's `combined_type`)
INDEX_FORMAT = "index:1.0"

#: the combined-fingerprint fields of a metadata item: JSON name -> attribute of Item
COMBINED_ATTRS: dict[str, str] = {
    "combined_sha256": "combined_sha256",
    "combined_rootxz_sha256": "combined_rootxz_sha256",
    "combined_squashfs_sha256": "combined_squashfs_sha256",
    "combined_disk-kvm-img_sha256": "combined_disk_kvm_img_sha256",
}


class Client(Enum):
    """A simplestreams client: the ftypes it reads a version's metadata and unified tarball
    from (each client reads only its own; the catalog lists both, identical but for ftype)."""

    LXD = ("lxd.tar.xz", "lxd_combined.tar.gz")
    INCUS = ("incus.tar.xz", "incus_combined.tar.gz")

    @property
    def meta_ftype(self) -> str:
        return self.value[0]

    @property
    def unified_ftype(self) -> str:
        return self.value[1]


@dataclass(frozen=True, slots=True)
class Item:
    """One file of a version: `items.<key>` of products:1.0."""

    ftype: str
    path: str
    size: int
    sha256: str
    combined_sha256: str | None = None
    combined_rootxz_sha256: str | None = None
    combined_squashfs_sha256: str | None = None
    combined_disk_kvm_img_sha256: str | None = None
    #: a delta (ftype *.vcdiff): the serial of the version it applies to
    delta_base: str | None = None
    #: a unified tarball: "container" or "virtual-machine" (Incus 7.0.1+ reads it; absent
    #: means container)
    combined_type: str | None = None

    def combined(self, root_ftype: str) -> str | None:
        """This metadata item's fingerprint of the image it makes with a `root_ftype` root
        (the first field the clients read for it), or None."""
        for name in COMBINED_FIELDS.get(root_ftype, ()):
            value: str | None = getattr(self, COMBINED_ATTRS[name])
            if value:
                return value
        return None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "ftype": self.ftype,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
        }
        for name, attr in COMBINED_ATTRS.items():
            if getattr(self, attr) is not None:
                doc[name] = getattr(self, attr)
        if self.delta_base is not None:
            doc["delta_base"] = self.delta_base
        if self.combined_type is not None:
            doc["combined_type"] = self.combined_type
        return doc


@dataclass(frozen=True, slots=True)
class Image:
    """An image as a client sees it: the files it downloads (metadata first) and the
    fingerprint it checks their concatenation against."""

    #: "container" or "virtual-machine"
    type: str
    #: the root's ftype (squashfs, root.tar.xz, disk-kvm.img) or "unified"
    root: str
    fingerprint: str
    files: tuple[Item, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


#: what may be derived from a Version and kept with it (Version.derived)
Derived = Literal["entry", "published", "page"]
_DERIVED_SLOTS: dict[str, str] = {name: "_d_" + name for name in get_args(Derived)}
_T = TypeVar("_T")


def _roots(first: Mapping[str, Item]) -> tuple[Item, ...]:
    found = (first.get(ftype) for ftype in COMBINED_FIELDS)
    return tuple(i for i in found if i is not None)


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a product: `versions.<serial>`."""

    serial: str
    items: Mapping[str, Item]
    #: what was derived from it (`derived`), one slot per name in DERIVED (a slot, not a dict:
    #: a catalog holds 20,000 Versions and more, each kept between publishes)
    _d_entry: object = field(default=None, init=False, repr=False, compare=False)
    _d_published: object = field(default=None, init=False, repr=False, compare=False)
    _d_page: object = field(default=None, init=False, repr=False, compare=False)

    def derived(self, name: Derived, make: Callable[[Version], _T]) -> _T:
        """`make(self)`, made at the first call for `name` and kept: a Version is not changed
        once built (a changed version is a new one), so what is derived from it never goes
        stale. The writer keeps so its entry's text (encode.py), its lines of the record of
        what is published (published.py) and what the page counts of it (page.py): an
        unchanged version is not encoded again, whatever publishes it next. `make` never
        returns None; each name is always made by the same function."""
        slot = _DERIVED_SLOTS[name]
        made = getattr(self, slot)
        if made is None:
            made = make(self)
            object.__setattr__(self, slot, made)
        return cast(_T, made)

    def _firsts(self) -> dict[str, Item]:
        """ftype -> its first item by item key (found anew at each call: not kept)."""
        first: dict[str, Item] = {}
        for k in sorted(self.items):
            first.setdefault(self.items[k].ftype, self.items[k])
        return first

    def by_ftype(self, ftype: str) -> Item | None:
        """The (first, by item key) item of `ftype`, or None."""
        return self._firsts().get(ftype)

    def roots(self) -> tuple[Item, ...]:
        """The root filesystems (ftypes a combined fingerprint exists for), in the order of
        COMBINED_FIELDS (squashfs, root.tar.xz, disk-kvm.img)."""
        return _roots(self._firsts())

    def images(self, client: Client) -> tuple[Image, ...]:
        """The images `client` sees in this version: one per root its metadata item has a
        fingerprint for (in the order of roots()), then the unified tarball's."""
        out: list[Image] = []
        first = self._firsts()
        meta = first.get(client.meta_ftype)
        if meta is not None:
            for root in _roots(first):
                fp = meta.combined(root.ftype)
                if fp:
                    kind = "virtual-machine" if root.ftype in VM_FTYPES else "container"
                    out.append(Image(kind, root.ftype, fp, (meta, root)))
        unified = first.get(client.unified_ftype)
        if unified is not None:
            kind = "virtual-machine" if unified.combined_type == VM_TYPE else "container"
            out.append(Image(kind, "unified", unified.sha256, (unified,)))
        return tuple(out)

    def client_images(self) -> tuple[Image, ...]:
        """The images of this version as clients see them: LXD's view, or Incus's when the
        version has no LXD items (the catalog lists both, the same images)."""
        return self.images(Client.LXD) or self.images(Client.INCUS)

    def deltas(self, root_ftype: str) -> tuple[Item, ...]:
        """The deltas to this version's `root_ftype` root, by their base serial."""
        found = [
            i for i in self.items.values() if i.ftype == f"{root_ftype}.vcdiff" and i.delta_base
        ]
        return tuple(sorted(found, key=lambda i: serial_sort_key(i.delta_base or "")))

    def to_json(self) -> dict[str, Any]:
        return {"items": {k: v.to_json() for k, v in self.items.items()}}


@dataclass(frozen=True, slots=True)
class Product:
    """One product (os:release:arch:variant): `products.<name>`."""

    name: str
    os: str
    release: str
    release_title: str
    arch: str
    variant: str
    aliases: tuple[str, ...]
    versions: Mapping[str, Version]
    requirements: Mapping[str, str] | None = None
    lxd_requirements: Mapping[str, str] | None = None
    release_codename: str | None = None
    support_eol: str | None = None

    def serials(self) -> list[str]:
        """The serials of its versions, oldest first."""
        return sorted(self.versions, key=serial_sort_key)

    def to_json(self) -> dict[str, Any]:
        return {**self.fields(), "versions": {s: v.to_json() for s, v in self.versions.items()}}

    def fields(self) -> dict[str, Any]:
        """Its fields as JSON values, but its versions."""
        doc: dict[str, Any] = {
            "os": self.os,
            "release": self.release,
            "release_title": self.release_title,
            "arch": self.arch,
            "variant": self.variant,
            "aliases": ",".join(self.aliases),
        }
        if self.requirements is not None:
            doc["requirements"] = dict(self.requirements)
        if self.lxd_requirements is not None:
            doc["lxd_requirements"] = dict(self.lxd_requirements)
        if self.release_codename is not None:
            doc["release_codename"] = self.release_codename
        if self.support_eol is not None:
            doc["support_eol"] = self.support_eol
        return doc


@dataclass(frozen=True, slots=True)
class Catalog:
    """images.json: a products:1.0 document of datatype image-downloads."""

    content_id: str
    datatype: str
    format: str
    updated: str
    products: Mapping[str, Product]

    def to_json(self) -> dict[str, Any]:
        return {
            "content_id": self.content_id,
            "datatype": self.datatype,
            "format": self.format,
            "products": {k: p.to_json() for k, p in self.products.items()},
            "updated": self.updated,
        }


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One document an index names: `index.<name>`."""

    datatype: str
    format: str
    path: str
    products: tuple[str, ...]
    updated: str

    def to_json(self) -> dict[str, Any]:
        return {
            "datatype": self.datatype,
            "format": self.format,
            "path": self.path,
            "products": list(self.products),
            "updated": self.updated,
        }


@dataclass(frozen=True, slots=True)
class Index:
    """index.json: an index:1.0 document."""

    format: str
    updated: str
    index: Mapping[str, IndexEntry]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "index": {k: e.to_json() for k, e in self.index.items()},
            "updated": self.updated,
        }


# --- the reader ----------------------------------------------------------------------------


def _obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object")
    return value


def _str(doc: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{where}.{key}: expected a string")
    return value


def _opt_str(doc: dict[str, Any], key: str, where: str) -> str | None:
    return None if doc.get(key) is None else _str(doc, key, where)


def _str_map(doc: dict[str, Any], key: str, where: str) -> dict[str, str] | None:
    value = doc.get(key)
    if value is None:
        return None
    value = _obj(value, f"{where}.{key}")
    if not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"{where}.{key}: expected string values")
    return dict(value)


def _item(doc: object, where: str) -> Item:
    # (the page reads every item of 20,000 versions: one look-up per field, no helper calls)
    d = _obj(doc, where)
    size = d.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"{where}.size: expected a count of bytes")
    combined: dict[str, str] = {}
    for name, attr in COMBINED_ATTRS.items():
        value = d.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"{where}.{name}: expected a string")
            combined[attr] = value
    ftype, path, sha256 = d.get("ftype"), d.get("path"), d.get("sha256")
    if not isinstance(ftype, str):
        raise ValueError(f"{where}.ftype: expected a string")
    if not isinstance(path, str):
        raise ValueError(f"{where}.path: expected a string")
    if not isinstance(sha256, str):
        raise ValueError(f"{where}.sha256: expected a string")
    base = d.get("delta_base")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{where}.delta_base: expected a string")
    kind = d.get("combined_type")
    if kind is not None and not isinstance(kind, str):
        raise ValueError(f"{where}.combined_type: expected a string")
    return Item(ftype, path, size, sha256, delta_base=base, combined_type=kind, **combined)


def _version(serial: str, doc: object, where: str) -> Version:
    items = _obj(_obj(doc, where).get("items"), f"{where}.items")
    return Version(serial, {k: _item(v, f"{where}.items.{k}") for k, v in items.items()})


def version_from_json(serial: str, doc: object, where: str) -> Version:
    """One version of a parsed images.json (`where` names it in the message); ValueError (one
    line) when it or one of its items is not well formed (sync reads an upstream's catalog a
    version at a time: one bad version does not void the others)."""
    return _version(serial, doc, where)


def _product(name: str, doc: object) -> Product:
    where = f"products.{name}"
    d = _obj(doc, where)
    versions = _obj(d.get("versions"), f"{where}.versions")
    return Product(
        name=name,
        os=_str(d, "os", where, ""),
        release=_str(d, "release", where, ""),
        release_title=_str(d, "release_title", where, ""),
        arch=_str(d, "arch", where, ""),
        variant=_str(d, "variant", where, ""),
        aliases=tuple(a for a in _str(d, "aliases", where, "").split(",") if a),
        versions={s: _version(s, v, f"{where}.versions.{s}") for s, v in versions.items()},
        requirements=_str_map(d, "requirements", where),
        lxd_requirements=_str_map(d, "lxd_requirements", where),
        release_codename=_opt_str(d, "release_codename", where),
        support_eol=_opt_str(d, "support_eol", where),
    )


def catalog_from_json(doc: object) -> Catalog:
    """The Catalog of a parsed images.json; ValueError (one line) when it is not one."""
    d = _obj(doc, "images.json")
    fmt = _str(d, "format", "images.json", PRODUCTS_FORMAT)
    if fmt != PRODUCTS_FORMAT:
        raise ValueError(f"images.json: format {fmt!r}, expected {PRODUCTS_FORMAT}")
    products = _obj(d.get("products"), "images.json.products")
    return Catalog(
        content_id=_str(d, "content_id", "images.json", ""),
        datatype=_str(d, "datatype", "images.json", ""),
        format=fmt,
        updated=_str(d, "updated", "images.json", ""),
        products={k: _product(k, v) for k, v in products.items()},
    )


def index_from_json(doc: object) -> Index:
    """The Index of a parsed index.json; ValueError (one line) when it is not one."""
    d = _obj(doc, "index.json")
    fmt = _str(d, "format", "index.json", INDEX_FORMAT)
    if fmt != INDEX_FORMAT:
        raise ValueError(f"index.json: format {fmt!r}, expected {INDEX_FORMAT}")
    entries: dict[str, IndexEntry] = {}
    for name, value in _obj(d.get("index"), "index.json.index").items():
        where = f"index.{name}"
        e = _obj(value, where)
        products = e.get("products", [])
        if not isinstance(products, list) or not all(isinstance(p, str) for p in products):
            raise ValueError(f"{where}.products: expected a list of strings")
        entries[name] = IndexEntry(
            datatype=_str(e, "datatype", where, ""),
            format=_str(e, "format", where, ""),
            path=_str(e, "path", where),
            products=tuple(products),
            updated=_str(e, "updated", where, ""),
        )
    return Index(fmt, _str(d, "updated", "index.json", ""), entries)


def parse_document(data: bytes, max_bytes: int | None = None) -> Any:
    """The JSON value of a document's bytes, at most `max_bytes` (MAX_CATALOG_BYTES) of them
    and MAX_CATALOG_DEPTH levels deep; ValueError (one line) otherwise, or when not JSON."""
    limit = MAX_CATALOG_BYTES if max_bytes is None else max_bytes
    return load_json_bounded(data, limit, MAX_CATALOG_DEPTH)


def read_document(path: str) -> Any:
    """The JSON value in the regular file `path` (the caller checks its shape).

    FileNotFoundError when it does not exist, another OSError when it cannot be read
    (fsutil.NotRegularFile for a link or FIFO), ValueError (one line) when it is too large,
    too deep or not JSON."""
    try:
        data = read_regular(path, MAX_CATALOG_BYTES)
    except TooLarge:
        raise ValueError(f"larger than {MAX_CATALOG_BYTES} bytes") from None
    return parse_document(data)


def parse_catalog(data: bytes, max_bytes: int | None = None) -> Catalog:
    """The catalog of images.json's bytes (a copy of it: the mirror's push), bounded as
    parse_document; ValueError (one line) when they are not one."""
    return catalog_from_json(parse_document(data, max_bytes))


def read_catalog(path: str) -> Catalog:
    """The catalog in the file `path` (images.json), read bounded (read_document).

    FileNotFoundError when it does not exist, another OSError when it cannot be read,
    ValueError (one line) when it is too large, too deep, not JSON or not a catalog."""
    return catalog_from_json(read_document(path))


def read_index(path: str) -> Index:
    """The index in the file `path` (index.json), read as read_catalog reads."""
    return index_from_json(read_document(path))
