"""A reader for SWORD zText Bible modules, and verse-aligned pairs of two of them.

SWORD (crosswire.org) stores a Bible "zText" module as three files per testament under the
module's DataPath (`ot.*` Old, `nt.*` New Testament):
- `.bzs` block index: 12-byte records, uint32 LE (offset in .bzz, compressed size, size);
- `.bzv` verse index: 10-byte records, uint32 LE block number, uint32 offset in the
  uncompressed block, uint16 size (0 = no text);
- `.bzz` the zlib-compressed blocks, concatenated.
The verse index is positional: with KJV versification, entry 0 is empty, entry 1 the
testament heading, then per book a book-heading entry and per chapter a chapter-heading entry
followed by its verses. So two modules with the same versification align by index, and the
table below (verses per chapter, KJV) names each position. Text is OSIS XML: `<note>`s are
dropped with their content, other tags are stripped, whitespace collapsed.

Used for DYNAMO's translation task: Reina-Valera 1909 (Debian `sword-text-sparv`) -> KJV
(Debian `sword-text-kjv`), both public domain (docs/dynamo.md lists the sources).
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

from stoker.errors import StokerError

# Books (OSIS names) each followed by its verses per chapter: KJV versification, read off the
# KJV module's own chapter markup (1,189 chapters, 31,102 verses).
_KJV = """
    Gen 31 25 24 26 32 22 24 22 29 32 32 20 18 24 21 16 27 33 38 18 34 24 20 67 34 35 46 22 35
    43 55 32 20 31 29 43 36 30 23 23 57 38 34 34 28 34 31 22 33 26 Exod 22 25 22 31 23 30 25 32
    35 29 10 51 22 31 27 36 16 27 25 26 36 31 33 18 40 37 21 43 46 38 18 35 23 35 35 38 29 31
    43 38 Lev 17 16 17 35 19 30 38 36 24 20 47 8 59 57 33 34 16 30 37 27 24 33 44 23 55 46 34
    Num 54 34 51 49 31 27 89 26 23 36 35 16 33 45 41 50 13 32 22 29 35 41 30 25 18 65 23 31 40
    16 54 42 56 29 34 13 Deut 46 37 29 49 33 25 26 20 29 22 32 32 18 29 23 22 20 22 21 20 23 30
    25 22 19 19 26 68 29 20 30 52 29 12 Josh 18 24 17 24 15 27 26 35 27 43 23 24 33 15 63 10 18
    28 51 9 45 34 16 33 Judg 36 23 31 24 31 40 25 35 57 18 40 15 25 20 20 31 13 31 30 48 25
    Ruth 22 23 18 22 1Sam 28 36 21 22 12 21 17 22 27 27 15 25 23 52 35 23 58 30 24 42 15 23 29
    22 44 25 12 25 11 31 13 2Sam 27 32 39 12 25 23 29 18 13 19 27 31 39 33 37 23 29 33 43 26 22
    51 39 25 1Kgs 53 46 28 34 18 38 51 66 28 29 43 33 34 31 34 34 24 46 21 43 29 53 2Kgs 18 25
    27 44 27 33 20 29 37 36 21 21 25 29 38 20 41 37 37 21 26 20 37 20 30 1Chr 54 55 24 43 26 81
    40 40 44 14 47 40 14 17 29 43 27 17 19 8 30 19 32 31 31 32 34 21 30 2Chr 17 18 17 22 14 42
    22 18 31 19 23 16 22 15 19 14 19 34 11 37 20 12 21 27 28 23 9 27 36 27 21 33 25 33 27 23
    Ezra 11 70 13 24 17 22 28 36 15 44 Neh 11 20 32 23 19 19 73 18 38 39 36 47 31 Esth 22 23 15
    17 14 14 10 17 32 3 Job 22 13 26 21 27 30 21 22 35 22 20 25 28 22 35 22 16 21 29 29 34 30
    17 25 6 14 23 28 25 31 40 22 33 37 16 33 24 41 30 24 34 17 Ps 6 12 8 8 12 10 17 9 20 18 7 8
    6 7 5 11 15 50 14 9 13 31 6 10 22 12 14 9 11 12 24 11 22 22 28 12 40 22 13 17 13 11 5 26 17
    11 9 14 20 23 19 9 6 7 23 13 11 11 17 12 8 12 11 10 13 20 7 35 36 5 24 20 28 23 10 12 20 72
    13 19 16 8 18 12 13 17 7 18 52 17 16 15 5 23 11 13 12 9 9 5 8 28 22 35 45 48 43 13 31 7 10
    10 9 8 18 19 2 29 176 7 8 9 4 8 5 6 5 6 8 8 3 18 3 3 21 26 9 8 24 13 10 7 12 15 21 10 20 14
    9 6 Prov 33 22 35 27 23 35 27 36 18 32 31 28 25 35 33 33 28 24 29 30 31 29 35 34 28 28 27
    28 27 33 31 Eccl 18 26 22 16 20 12 29 17 18 20 10 14 Song 17 17 11 16 16 13 13 14 Isa 31 22
    26 6 30 13 25 22 21 34 16 6 22 32 9 14 14 7 25 6 17 25 18 23 12 21 13 29 24 33 9 20 24 17
    10 22 38 22 8 31 29 25 28 28 25 13 15 22 26 11 23 15 12 17 13 12 21 14 21 22 11 12 19 12 25
    24 Jer 19 37 25 31 31 30 34 22 26 25 23 17 27 22 21 21 27 23 15 18 14 30 40 10 38 24 22 17
    32 24 40 44 26 22 19 32 21 28 18 16 18 22 13 30 5 28 7 47 39 46 64 34 Lam 22 22 66 22 22
    Ezek 28 10 27 17 17 14 27 18 11 22 25 28 23 23 8 63 24 32 14 49 32 31 49 27 17 21 36 26 21
    26 18 32 33 31 15 38 28 23 29 49 26 20 27 31 25 24 23 35 Dan 21 49 30 37 31 28 28 27 27 21
    45 13 Hos 11 23 5 19 15 11 16 14 17 15 12 14 16 9 Joel 20 32 21 Amos 15 16 15 13 27 14 17
    14 15 Obad 21 Jonah 17 10 10 11 Mic 16 13 12 13 15 16 20 Nah 15 13 19 Hab 17 20 19 Zeph 18
    15 20 Hag 15 23 Zech 21 13 10 14 11 15 14 23 17 12 17 14 9 21 Mal 14 17 18 6 Matt 25 23 17
    25 48 34 29 34 38 42 30 50 58 36 39 28 27 35 30 34 46 46 39 51 46 75 66 20 Mark 45 28 35 41
    43 56 37 38 50 52 33 44 37 72 47 20 Luke 80 52 38 44 39 49 50 56 62 42 54 59 35 35 32 31 37
    43 48 47 38 71 56 53 John 51 25 36 54 47 71 53 59 41 42 57 50 38 31 27 33 26 40 42 31 25
    Acts 26 47 26 37 42 15 60 40 43 48 30 25 52 28 41 40 34 28 41 38 40 30 35 27 27 32 44 31
    Rom 32 29 31 25 21 23 25 39 33 21 36 21 14 23 33 27 1Cor 31 16 23 21 13 20 40 13 27 33 34
    31 13 40 58 24 2Cor 24 17 18 18 21 18 16 24 15 18 33 21 14 Gal 24 21 29 31 26 18 Eph 23 22
    21 32 33 24 Phil 30 30 21 23 Col 29 23 25 18 1Thess 10 20 13 18 28 2Thess 12 17 18 1Tim 20
    15 16 16 25 21 2Tim 18 26 17 22 Titus 16 15 15 Phlm 25 Heb 14 18 19 16 14 20 28 13 28 39 40
    29 25 Jas 27 26 18 17 20 1Pet 25 25 22 19 14 2Pet 21 22 18 1John 10 29 24 21 21 2John 13
    3John 14 Jude 25 Rev 20 29 22 11 14 17 17 13 21 11 19 17 18 20 8 21 18 24 21 15 27 21
"""
_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_TAG = re.compile(r"<[^>]+>")
# RV1909 glues words across adjacent word/added-word elements: `</w><transChange>también`.
_GLUED = re.compile(r"</(w|transChange)>(?=<(?:w|transChange)\b)")


def kjv_versification() -> list[tuple[str, list[int]]]:
    """[(book, [verses in chapter 1, 2, ...]), ...] for the 66 books, Genesis to Revelation."""
    books: list[tuple[str, list[int]]] = []
    for word in _KJV.split():
        if word.isdigit():
            books[-1][1].append(int(word))
        else:
            books.append((word, []))
    return books


def verse_refs(testament: str) -> list[str | None]:
    """The reference ("Gen 1:1") at each verse-index position of a testament; None = heading."""
    books = kjv_versification()
    books = books[:39] if testament == "ot" else books[39:]
    refs: list[str | None] = [None, None]  # empty entry, testament heading
    for book, chapters in books:
        refs.append(None)  # book heading
        for c, n in enumerate(chapters, 1):
            refs.append(None)  # chapter heading
            refs.extend(f"{book} {c}:{v}" for v in range(1, n + 1))
    return refs


def clean_osis(markup: str) -> str:
    """Plain text of an OSIS fragment: notes dropped, tags stripped, paragraph marks (¶)
    dropped, whitespace collapsed."""
    text = _TAG.sub("", _GLUED.sub(r"</\1> ", _NOTE.sub("", markup)))
    return " ".join(text.replace("\u00b6", " ").split())


def read_conf(conf: Path) -> dict[str, str]:
    """The key=value lines of a mods.d/*.conf file (the [section] line is `name`)."""
    out: dict[str, str] = {}
    for line in conf.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            out.setdefault("name", line[1:-1])
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), value.strip())
    return out


def _module_dir(conf: Path) -> Path:
    """Checks the module is a zlib zText with KJV versification; returns its data directory."""
    meta = read_conf(conf)
    want = {"ModDrv": "zText", "CompressType": "ZIP", "Versification": "KJV"}
    defaults = {"Versification": "KJV"}  # SWORD's default when the key is absent
    for key, value in want.items():
        got = meta.get(key, defaults.get(key, "(missing)"))
        if got.lower() != value.lower():
            raise StokerError(
                f"{conf}: {key}={got}, but only {key}={value} SWORD modules can be read; "
                "give a zText module with zlib blocks and KJV versification"
            )
    if meta.get("BlockType", "BOOK").upper() not in ("BOOK", "CHAPTER", "VERSE"):
        raise StokerError(
            f"{conf}: unknown BlockType={meta['BlockType']}; want BOOK, CHAPTER or VERSE"
        )
    data = (conf.parent.parent / meta.get("DataPath", "")).resolve()
    if not (data / "ot.bzv").is_file() and not (data / "nt.bzv").is_file():
        raise StokerError(
            f"{conf}: no ot.bzv/nt.bzv under DataPath {data}; is the module installed?"
        )
    return data


def _read_testament(data: Path, testament: str) -> list[str]:
    """The raw markup at every verse-index position of one testament ('' where absent)."""
    if not (data / f"{testament}.bzv").is_file():
        return []
    bzs = (data / f"{testament}.bzs").read_bytes()
    bzv = (data / f"{testament}.bzv").read_bytes()
    bzz = (data / f"{testament}.bzz").read_bytes()
    if len(bzs) % 12 or len(bzv) % 10:
        raise StokerError(
            f"{data}: {testament}.bzs/.bzv sizes are not 12/10-byte records; corrupt module"
        )
    blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
    cache: dict[int, bytes] = {}
    out = []
    for i in range(0, len(bzv), 10):
        block, start, size = struct.unpack_from("<IIH", bzv, i)
        if size == 0 or block >= len(blocks):
            out.append("")
            continue
        if block not in cache:
            offset, csize, _ = blocks[block]
            try:
                cache[block] = zlib.decompress(bzz[offset : offset + csize])
            except zlib.error as e:
                raise StokerError(
                    f"{data}: block {block} of {testament}.bzz: {e}; corrupt module"
                ) from None
        out.append(cache[block][start : start + size].decode("utf-8", errors="replace"))
    return out


def read_ztext(conf: str | Path) -> dict[str, str]:
    """{"Gen 1:1": plain text, ...} for every verse with text of the module `conf` describes."""
    conf = Path(conf)
    if not conf.is_file():
        raise StokerError(f"{conf} does not exist; give a SWORD module's mods.d/*.conf file")
    data = _module_dir(conf)
    verses: dict[str, str] = {}
    for testament in ("ot", "nt"):
        entries = _read_testament(data, testament)
        refs = verse_refs(testament)
        if entries and len(entries) != len(refs):
            raise StokerError(
                f"{data}: {testament}.bzv has {len(entries)} entries, KJV versification "
                f"with headings needs {len(refs)}; not a KJV-versified module"
            )
        for ref, markup in zip(refs, entries, strict=False):
            text = clean_osis(markup) if ref else ""
            if text:
                verses[ref] = text
    return verses


def bible_pairs(source_conf: str | Path, target_conf: str | Path) -> list[dict[str, str]]:
    """[{"source", "target", "ref"}] for each verse both modules have text for, in Bible order.

    A verse one module lacks marks a versification mismatch hidden under the same KJV slots
    (RV1909 puts KJV Num 12:16 at Num 13:1 and shifts that whole chapter by one), so the
    chapter with the gap and the next one are dropped entirely.
    """
    source, target = read_ztext(source_conf), read_ztext(target_conf)
    bad: set[tuple[str, int]] = set()
    for ref in source.keys() ^ target.keys():
        book, chapter = _chapter(ref)
        bad |= {(book, chapter), (book, chapter + 1)}
    return [
        {"source": text, "target": target[ref], "ref": ref}
        for ref, text in source.items()
        if ref in target and _chapter(ref) not in bad
    ]


def _chapter(ref: str) -> tuple[str, int]:
    book, verse = ref.rsplit(" ", 1)
    return book, int(verse.split(":")[0])
