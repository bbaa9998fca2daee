"""DYNAMO's real task data (stoker.tasks.dynamo.sources, .sword): counts, verified spans, known
records, fixed splits, caps, and the loaders of users' local SST-2/SQuAD/XSum/MBPP/WMT files."""

import ast
import hashlib
import importlib.util
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stoker.errors import StokerError
from stoker.tasks.dynamo import metrics as M
from stoker.tasks.dynamo.sources import (
    cap,
    load_records,
    split_key,
    split_of,
    validate_records,
    wiki_qa,
)
from stoker.tasks.dynamo.sword import bible_pairs, clean_osis, read_ztext


def records(data: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (data / f"{name}.jsonl").read_text().splitlines()]


def test_manifest_checksums_and_counts_match_the_files(dynamo_data):
    manifest = json.loads((dynamo_data / "manifest.json").read_text())
    for name, meta in manifest["files"].items():
        data = (dynamo_data / f"{name}.jsonl").read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], name
        assert data.count(b"\n") == meta["records"] == sum(meta["splits"].values()), name
    assert manifest["debian_versions"].keys() == {"sword-text-kjv", "sword-text-sparv"}


def test_sentiment_is_3000_balanced_real_sentences(dynamo_data):
    recs = records(dynamo_data, "sentiment")
    assert abs(len(recs) - 3000) <= 5
    assert sum(r["label"] for r in recs) == pytest.approx(len(recs) / 2, abs=10)
    assert {r["origin"] for r in recs} == {"amazon", "imdb", "yelp"}
    assert {"text": "Wow... Loved this place.", "label": 1, "origin": "yelp"} in recs
    assert validate_records("sentiment", recs)[1] == []


def test_qa_has_5000_questions_whose_answers_are_verified_spans(dynamo_data):
    recs = records(dynamo_data, "qa")
    assert len(recs) >= 5000
    assert len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        for a in r["answers"]:
            assert r["context"][a["answer_start"] : a["answer_start"] + len(a["text"])] == a["text"]
    questions = [r["question"] for r in recs]
    for template in ("What is ", "Who was ", " in what year", "another name for ", "population"):
        assert sum(template in q for q in questions) >= 40, template
    assert all(q.endswith("?") and "\n" not in q for q in questions)


def test_qa_templates_on_a_known_article():
    article = {
        "title": "2001: A Space Odyssey",
        "topic": "Arts",
        "description": "1968 film by Stanley Kubrick",
        "extract": "2001: A Space Odyssey is a 1968 epic science fiction film produced and "
        "directed by Stanley Kubrick. The film was released in 1968 to mixed reviews. "
        'Its plot was inspired by the short story "The Sentinel".',
    }
    by_question = {r["question"]: [a["text"] for a in r["answers"]] for r in wiki_qa([article])}
    assert by_question["What is 2001: A Space Odyssey?"] == ["1968 epic science fiction film"]
    assert by_question["Who directed 2001: A Space Odyssey?"] == ["Stanley Kubrick"]
    assert by_question["The film was released in what year to mixed reviews?"] == ["1968"]
    assert wiki_qa([dict(article, extract="No template fits here")]) == []


@pytest.mark.parametrize("extract, question, answer", [
    ("Paraguay is a country. Its capital is Asunción. It dates from 1537.",
     "What is the capital of Paraguay?", "Asunción"),  # the full stop ends a name
    ("Missouri is a state. Its capital is St. Louis de Gonzaga.",
     "What is the capital of Missouri?", "St. Louis de Gonzaga"),
    ("The Hobbit is a novel written by J. R. R. Tolkien. It was a success.",
     "Who wrote The Hobbit?", "J. R. R. Tolkien"),
])  # fmt: skip
def test_qa_names_end_where_the_name_ends(extract, question, answer):
    title = extract.split(" is ")[0]
    by_question = {r["question"]: [a["text"] for a in r["answers"]]
                   for r in wiki_qa([{"title": title, "extract": extract}])}  # fmt: skip
    assert by_question[question] == [answer], by_question


def test_qa_real_holds_allennlp_squad_fixture(dynamo_data):
    recs = records(dynamo_data, "qa_real")
    assert len(recs) >= 20 and sum(r["origin"] == "squad" for r in recs) == 5
    assert validate_records("qa", recs)[1] == []
    q = "To whom did the Virgin Mary allegedly appear in 1858 in Lourdes France?"
    (hit,) = [r for r in recs if r["question"] == q]
    assert hit["answers"][0] == {"text": "Saint Bernadette Soubirous", "answer_start": 515}


def test_summarization_pairs_lead_paragraphs_with_descriptions(dynamo_data):
    recs = records(dynamo_data, "summarization")
    assert len(recs) >= 9000 and all(r["source"] and r["target"] for r in recs)
    kubrick = [r for r in recs if r["source"].startswith("2001: A Space Odyssey is a 1968")]
    assert [r["target"] for r in kubrick] == ["1968 film by Stanley Kubrick"]


def test_translation_aligns_rv1909_with_kjv_verse_by_verse(dynamo_data):
    recs = records(dynamo_data, "translation")
    assert len(recs) >= 30000
    by_ref = {r["ref"]: r for r in recs}
    assert len(by_ref) == len(recs)
    assert by_ref["Gen 1:1"]["source"] == "EN el principio crió Dios los cielos y la tierra."
    assert by_ref["Gen 1:1"]["target"] == "In the beginning God created the heaven and the earth."
    assert by_ref["John 3:16"]["target"].startswith("For God so loved the world,")
    assert by_ref["John 3:16"]["source"].startswith("Porque de tal manera amó Dios al mundo,")
    assert by_ref["Rev 22:21"]["source"].endswith("Amén.")
    assert not any("<" in r["source"] + r["target"] or "¶" in r["target"] for r in recs)
    # RV1909 stores KJV Num 12:16 as its Num 13:1: that chapter (shifted) is left out
    assert "Num 13:1" not in by_ref and "Num 14:1" in by_ref


def test_code_targets_parse_as_bodies_of_their_def_line(dynamo_data):
    recs = records(dynamo_data, "code")
    stdlib = [r for r in recs if r["origin"].startswith("stdlib:")]
    humaneval = [r for r in recs if r["origin"].startswith("HumanEval/")]
    assert len(stdlib) >= 1000 and len(humaneval) == 164
    for r in stdlib:
        def_line = r["source"].splitlines()[0]
        assert def_line.startswith(("def ", "async def ")) and def_line.endswith(":")
        assert 1 <= len(r["target"].splitlines()) <= 12
        ast.parse(def_line + "\n" + r["target"])
    for r in humaneval:
        ast.parse(r["source"] + r["target"])
    # the evaluation's parse rate scores every reference 100 and its empty output 0
    assert M.parse_rate([r["target"] for r in recs], [r["source"] for r in recs]) == 100.0
    assert M.parse_rate([""] * len(recs), [r["source"] for r in recs]) == 0.0
    assert {"test", "entry_point"} <= humaneval[0].keys()


def test_translation_splits_are_about_10_10_80(dynamo_data):
    keys = [split_key("translation", r) for r in records(dynamo_data, "translation")]
    splits = [split_of(k) for k in keys]
    for name, want in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert splits.count(name) / len(splits) == pytest.approx(want, abs=0.01), name
    assert [split_of(k, val=0.2, test=0.0) for k in keys].count("test") == 0


def test_qa_questions_of_one_article_share_a_split(dynamo_data):
    seen: dict[str, set[str]] = {}
    for r in records(dynamo_data, "qa"):
        seen.setdefault(r["context"], set()).add(split_of(split_key("qa", r)))
    assert all(len(s) == 1 for s in seen.values()) and len(seen) >= 3000


def test_caps_keep_each_records_split_and_nest(dynamo_data):
    recs = records(dynamo_data, "summarization")
    split = {r["source"]: split_of(split_key("summarization", r)) for r in recs}
    small, large = cap(recs, 500, seed=3), cap(recs, 2000, seed=3)
    assert len(small) == 500 and len(large) == 2000
    assert all(split_of(split_key("summarization", r)) == split[r["source"]] for r in small)
    assert all(r in large for r in small)
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    assert sorted(map(str, cap(shuffled, 500, seed=3))) == sorted(map(str, small))
    assert cap(recs, 500, seed=4) != small
    assert cap(recs, None) == recs and cap(recs, 10**9) == recs


def test_bad_split_fractions_and_caps_are_errors():
    with pytest.raises(StokerError, match="split fractions"):
        split_of("x", val=0.6, test=0.6)
    with pytest.raises(StokerError, match="cap must be >= 0"):
        cap([{"a": 1}, {"a": 2}], -1)


# ---- users' local files of the original datasets ---------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


SQUAD_HF = {
    "id": "5733be284776f41900661182",
    "title": "University_of_Notre_Dame",
    "context": "It is a replica of the grotto at Lourdes, France.",
    "question": "Where is the grotto a replica of?",
    "answers": {"text": ["Lourdes, France"], "answer_start": [33]},
}


def test_load_records_maps_sst2_squad_xsum_cnndm_mbpp_wmt_columns(tmp_path):
    sst2 = write_jsonl(tmp_path / "sst2.jsonl", [{"idx": 0, "sentence": "a gem ", "label": 1}])
    assert load_records("sentiment", sst2) == [{"text": "a gem ", "label": 1}]
    squad = write_parquet(tmp_path / "squad.parquet", [SQUAD_HF])
    (rec,) = load_records("qa", squad)
    assert rec["answers"] == [{"text": "Lourdes, France", "answer_start": 33}]
    assert rec["id"] == SQUAD_HF["id"] and validate_records("qa", [rec])[1] == []
    xsum = [{"id": "1", "document": "Long text.", "summary": "Short."}]
    assert load_records("summarization", write_parquet(tmp_path / "xsum.parquet", xsum)) == [
        {"source": "Long text.", "target": "Short."}
    ]
    cnn = write_jsonl(tmp_path / "cnn.jsonl", [{"article": "A.", "highlights": "B.", "id": "x"}])
    assert load_records("summarization", cnn) == [{"source": "A.", "target": "B."}]
    mbpp = [{"task_id": 1, "text": "Add two numbers.", "code": "def f(a, b): return a + b"}]
    assert load_records("code", write_parquet(tmp_path / "mbpp.parquet", mbpp))[0] == {
        "source": "Add two numbers.",
        "target": "def f(a, b): return a + b",
    }
    wmt = write_jsonl(tmp_path / "wmt.jsonl", [{"translation": {"de": "Hallo", "en": "Hello"}}])
    got = load_records("translation", wmt, source_lang="de", target_lang="en")
    assert got == [{"source": "Hallo", "target": "Hello"}]


def test_load_records_reads_nested_squad_json_and_our_jsonl(tmp_path, dynamo_data):
    qas = [{"id": "q1", "question": "Where?", "answers": [{"text": "Lourdes", "answer_start": 33}]}]
    nested = {"data": [{"paragraphs": [{"context": SQUAD_HF["context"], "qas": qas}]}]}
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(nested))
    (rec,) = load_records("qa", tmp_path / "dev-v1.1.json")
    assert rec["id"] == "q1" and rec["answers"] == [{"text": "Lourdes", "answer_start": 33}]
    ours = load_records("translation", dynamo_data / "translation.jsonl")
    assert len(ours) >= 30000 and ours[0]["source"].startswith("EN el principio")


def test_load_records_names_the_columns_it_found(tmp_path):
    bad = write_jsonl(tmp_path / "x.jsonl", [{"sentence": "hi", "score": 0.5}])
    with pytest.raises(StokerError, match=r"columns: score, sentence.*\(sentence, label\)"):
        load_records("sentiment", bad)
    no_answers = write_parquet(tmp_path / "q.parquet", [{"question": "q", "context": "c"}])
    with pytest.raises(StokerError, match="columns: context, question"):
        load_records("qa", no_answers)
    wmt = write_jsonl(tmp_path / "wmt.jsonl", [{"translation": {"de": "Hallo", "en": "Hello"}}])
    with pytest.raises(StokerError, match=r"languages \['de', 'en'\]"):
        load_records("translation", wmt, source_lang="fr", target_lang="en")


def test_load_records_bad_paths_and_kinds(tmp_path):
    with pytest.raises(StokerError, match="does not exist"):
        load_records("qa", tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(StokerError, match="unknown format"):
        load_records("qa", tmp_path / "x.csv")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{"text": \n')
    with pytest.raises(StokerError, match="not valid JSON lines"):
        load_records("sentiment", tmp_path / "broken.jsonl")
    with pytest.raises(StokerError, match="unknown DYNAMO task kind"):
        load_records("ner", tmp_path / "x.csv")


def test_load_records_of_a_saved_dataset_dir(tmp_path):
    if importlib.util.find_spec("datasets") is None:
        (tmp_path / "sst2").mkdir()
        with pytest.raises(StokerError, match="pip install datasets"):
            load_records("sentiment", tmp_path / "sst2")
        return
    import datasets

    rows = {"sentence": ["fine"], "label": [1]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "d")
    with pytest.raises(StokerError, match=r"splits \['train'\]"):
        load_records("sentiment", tmp_path / "d")
    assert load_records("sentiment", tmp_path / "d", split="train") == [
        {"text": "fine", "label": 1}
    ]


def test_validate_records_reports_each_unusable_record():
    ctx = "Paris is the capital of France."

    def qa(rid: str, start: int | None) -> dict:
        answers = [] if start is None else [{"text": "Paris", "answer_start": start}]
        return {"id": rid, "question": "Capital?", "context": ctx, "answers": answers}

    qa = [qa("a", 0), qa("b", 3), qa("c", None)]
    good, problems = validate_records("qa", qa)
    assert [r["id"] for r in good] == ["a"]
    assert problems == [
        "record 1: answer 'Paris' at 3 is not that span of the context",
        "record 2: has no answer",
    ]
    sentiment = [{"text": "ok", "label": 1}, {"text": "ok", "label": 2}, {"text": " ", "label": 0}]
    assert len(validate_records("sentiment", sentiment)[1]) == 2
    assert len(validate_records("code", [{"source": "def f():", "target": ""}])[1]) == 1


# ---- the SWORD reader ---------------------------------------------------------------------------


def test_clean_osis_drops_notes_and_tags_and_unglues_words():
    markup = (
        'In the <w lemma="strong:H7225">beginning</w><note placement="foot">Heb. first</note>'
        ' ¶ God <transChange type="added">was</transChange><w>there</w>.'
    )
    assert clean_osis(markup) == "In the beginning God was there."


def test_sword_reader_refuses_other_formats(tmp_path, dynamo_raw):
    mods = tmp_path / "mods.d"
    mods.mkdir()
    for line in ("CompressType=LZSS", "Versification=Catholic", "ModDrv=RawText"):
        conf = mods / "x.conf"
        conf.write_text(f"[X]\n{line}\nModDrv=zText\nCompressType=ZIP\nDataPath=./m/\n")
        with pytest.raises(StokerError, match=line):
            read_ztext(conf)
    with pytest.raises(StokerError, match="does not exist"):
        bible_pairs(tmp_path / "none.conf", tmp_path / "none.conf")
    kjv = next((dynamo_raw["sword-kjv-sparv"] / "root/usr/share/sword/mods.d").glob("engKJV*"))
    verses = read_ztext(kjv)
    assert len(verses) == 31102 and verses["Rev 22:21"].endswith("Amen.")
