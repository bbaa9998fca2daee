"""DYNAMO's metrics against hand-computed values and independent implementations."""

import pytest

from stoker.tasks.dynamo import metrics as M


def test_squad_normalization_and_scores_by_hand():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    assert M.normalize_answer("an Apple a day") == "apple day"
    # pred "the big cat" -> [big, cat]; gold "a cat sat" -> [cat, sat]: 1 common, P=R=1/2
    assert M.squad_f1("the big cat", "a cat sat") == pytest.approx(0.5)
    assert M.squad_f1("dog", "cat") == 0.0
    scores = M.squad_scores({"1": "The Cat", "2": "big cat", "3": ""},
                            {"1": ["cat", "a dog"], "2": ["cat"], "3": ["x"]})  # fmt: skip
    # EM: 1, 0, 0; F1: 1, 2·(1/2·1)/(1/2+1) = 2/3, 0
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[-1][-1]


def test_rouge_l_is_the_lcs_f_measure():
    pred, ref = "the quick fox jumped over a dog", "a quick brown fox leaped over the lazy dog"
    p, r = pred.split(), ref.split()  # the stemmer changes no match here (jumped/leaped differ)
    lcs = _lcs([w.removesuffix("ed") for w in p], [w.removesuffix("ed") for w in r])
    prec, rec = lcs / len(p), lcs / len(r)
    expected = 100 * 2 * prec * rec / (prec + rec)
    assert M.rouge_scores([pred], [ref])["rougeL"] == pytest.approx(expected)
    assert M.rouge_scores([ref], [ref]) == pytest.approx(
        {"rouge1": 100, "rouge2": 100, "rougeL": 100}
    )


def test_bleu_exact_match_parse_rate_accuracy():
    assert M.bleu_score(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(
        100
    )
    assert M.bleu_score(["completely different words"], ["the cat sat on the mat"]) < 1
    assert M.exact_match(["a b", " c"], ["a b", "d"]) == 50.0
    assert M.parse_rate(["def f():\n    return 1\n", "def (:", "", "x = 1"]) == 50.0


def test_parse_rate_with_prompts_counts_only_bodies_of_the_prompts_function():
    prompt = 'import os\n\ndef f(x):\n    """Double x."""\n'
    bodies = {
        "    return 2 * x\n": True,
        "    y = x\n    return y + x": True,  # no final newline
        "": False,  # the docstring alone is a complete body: an empty output must not count
        "\n\n": False,
        "foo": False,  # valid Python, but a module-level statement, not the function's body
        "    return (\n": False,
        "    return x\nprint(1)\n": False,  # runs out of the function
    }
    for body, ok in bodies.items():
        assert M.completes(prompt, body) is ok, body
    assert M.parse_rate(list(bodies), [prompt] * len(bodies)) == pytest.approx(200 / 7)
    assert M.completes("def g():", "    pass")  # a prompt without its newline
    assert not M.completes("def (:", "    pass")
    assert M.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 50.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        M.exact_match(["a", "b"], ["a"])
