"""The benchmarks' metrics against numbers worked out by hand from each published definition (every expected value
below is derived in its comment, never by the code under test), the normalisation edge cases included; the registry,
`score_row`, `summarize`; and the presets against the lmms-eval 0.7.3 settings they cite."""

from __future__ import annotations

import pytest

from qwen2vl_jax.evaluation.metrics import (
    METRICS,
    anls,
    box_iou,
    choice_accuracy,
    exact_match,
    iou_accuracy,
    levenshtein,
    parse_choice,
    relaxed_accuracy,
    score_row,
    summarize,
    textvqa_accuracy,
    vqa_accuracy,
)
from qwen2vl_jax.evaluation.presets import PRESETS, Preset, preset
from qwen2vl_jax.evaluation.vqa_normalize import normalize_answer, normalize_textvqa_answer

# ------------------------------------------------------------------------------------------------ ANLS
# Biten et al. 2019 / the DocVQA RRC script: per question, max over answers of 1 - NL, zeroed when 1 - NL < 0.5;
# NL = edit distance / longer length, on lower-cased, whitespace-collapsed strings.
ANLS_CASES = [
    ("Hello", ["hello"], 1.0),                        # case folds: distance 0
    ("  Hello   World ", ["hello world"], 1.0),       # whitespace collapses to "hello world": distance 0
    ("abcd", ["abxd"], 0.75),                         # one substitution in 4: NL 1/4, score 3/4
    ("abcde", ["abxye"], 0.6),                        # two substitutions in 5: NL 2/5, score 3/5
    ("ab", ["ac"], 0.5),                              # NL exactly 1/2: 1 - NL = 0.5 is not < 0.5, so it stays 0.5
    ("abc", ["axy"], 0.0),                            # NL 2/3 > 1/2: 1 - NL = 1/3 < 0.5 -> 0
    ("abcdefgh", ["abcdwxyz"], 0.5),                  # 4 substitutions in 8: NL 1/2 -> 0.5 (threshold kept)
    ("abcdefgh", ["abcvwxyz"], 0.0),                  # 5 in 8: NL 5/8 -> 1 - NL = 3/8 < 0.5 -> 0
    ("abcd", ["zzzz", "abcx"], 0.75),                 # the best answer counts: "zzzz" 0, "abcx" 3/4
    ("", ["abc"], 0.0),                               # empty prediction: 3 insertions / 3 -> NL 1 -> 0
    ("cat", ["cats"], 0.75),                          # one insertion, longer length 4: 1 - 1/4
    ("1,000", ["1000"], 0.8),                         # no number handling: one deletion in 5 -> 1 - 1/5
]


@pytest.mark.parametrize("prediction,answers,expected", ANLS_CASES)
def test_anls(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected)


def test_anls_threshold_keyword_and_edge_cases():
    assert anls("abcd", ["abxd"], threshold=0.8) == 0.0  # 0.75 < 0.8
    assert anls("abcd", ["abxd"], threshold=0.75) == pytest.approx(0.75)  # at the threshold: kept
    assert anls("", [""]) == 1.0  # two empty strings are identical
    assert anls("x", "x") == 1.0  # one answer as a plain string
    with pytest.raises(ValueError, match="no reference"):
        anls("x", [])


@pytest.mark.parametrize("a,b,distance", [("kitten", "sitting", 3), ("", "abc", 3), ("flaw", "lawn", 2),
                                          ("abc", "abc", 0)])
def test_levenshtein(a, b, distance):
    # kitten -> sitten -> sittin -> sitting (2 substitutions, 1 insertion); flaw -> law -> lawn
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


# ------------------------------------------------------------------------------------------------ VQA accuracy
# vqaEval.py (GT-Vision-Lab/VQA): acc = mean over the 10 leave-one-out subsets of min(1, matches among the other 9 / 3).
# With k of 10 humans matching: the k subsets that drop a match keep k - 1, the other 10 - k keep k.
def _ten(k: int, answer: str = "2", other: str = "3") -> list[str]:
    return [answer] * k + [other] * (10 - k)


@pytest.mark.parametrize("k,expected", [
    (0, 0.0),   # no subset has a match
    (1, 0.3),   # (1 * min(1, 0/3) + 9 * min(1, 1/3)) / 10 = 3/10
    (2, 0.6),   # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
    (3, 0.9),   # (3 * 2/3 + 7 * 1) / 10 = 9/10
    (4, 1.0),   # (4 * min(1, 3/3) + 6 * 1) / 10 = 1
    (10, 1.0),  # every subset has 9 matches
])
def test_vqa_leave_one_out(k, expected):
    assert vqa_accuracy("2", _ten(k)) == pytest.approx(expected)


@pytest.mark.parametrize("prediction,answer,expected", [
    ("the cat", "cat", 1.0),        # articles a / an / the are dropped: "the cat" -> "cat"
    ("A cat", "cat", 1.0),          # lower-cased, then "a" dropped
    ("two", "2", 1.0),              # number words up to ten become digits: "two" -> "2"
    ("None", "0", 1.0),             # "none" counts as zero in vqaEval.py's manualMap
    ("eleven", "11", 0.0),          # the map stops at ten
    ("dont", "don't", 1.0),         # the contractions map restores the apostrophe
    ("1,000", "1000", 1.0),         # digit,digit found: punctuation deleted, "1,000" -> "1000"
    ("yes.", "yes", 1.0),           # a period not followed by a digit is removed
    ("3.5", "35", 0.0),             # a period before a digit stays: "3.5" != "35"
    ("red/blue", "red blue", 1.0),  # '/' with no space next to it becomes a space
    ("red / blue", "red blue", 1.0),  # ' /' next to a space: deleted, then the spaces collapse
    ("\nyes\t", "yes", 1.0),        # newlines and tabs become spaces, the ends are stripped
    ("Yes!", "yes", 1.0),           # '!' is in the punctuation list, case folds
    ("it's", "its", 0.0),           # the apostrophe is not in the list: "it's" stays
])
def test_vqa_normalisation_edge_cases(prediction, answer, expected):
    # 10 humans all gave `answer`: a normalised match is 1.0 (each subset keeps 9 matches), else 0
    assert vqa_accuracy(prediction, [answer] * 10) == expected


def test_vqa_answers_are_normalised_too():
    # the human answers go through the same processing: "Two" / "two." both become "2"; 2 of them + 8 others,
    # prediction "2" -> k = 2 -> 0.6
    assert vqa_accuracy("2", ["Two", "two."] + ["3"] * 8) == pytest.approx(0.6)


def test_vqa_other_answer_counts():
    # 3 answers all "cat": each subset leaves 2 matches -> min(1, 2/3) = 2/3
    assert vqa_accuracy("cat", ["cat", "cat", "cat"]) == pytest.approx(2 / 3)
    # 5 answers, 2 match: the 2 subsets dropping a match keep 1 (1/3), the other 3 keep 2 (2/3): (2/3 + 2) / 5
    assert vqa_accuracy("cat", ["cat", "cat", "dog", "dog", "dog"]) == pytest.approx((2 / 3 + 2) / 5)
    # a single answer: nothing to leave one out from, scored as the normalised match
    assert vqa_accuracy("The cat", "cat") == 1.0
    assert vqa_accuracy("dog", "cat") == 0.0


def test_normalisers_directly():
    assert normalize_answer("Two dogs.") == "2 dogs"  # "two" -> "2", final period removed
    assert normalize_answer("x,y") == "x y"  # no digit,digit and no space next to ',': a space
    # TextVQA's EvalAI processor deletes every ',' and '?' first, and splits off "'s"
    assert normalize_textvqa_answer("x,y") == "xy"
    assert normalize_textvqa_answer("cat's") == "cat 's"
    assert normalize_textvqa_answer("What?") == "what"


def test_textvqa_accuracy():
    # "x,y" vs ten "x y": the VQA processing makes both "x y" (1.0); TextVQA's makes the prediction "xy" (0.0)
    assert vqa_accuracy("x,y", ["x y"] * 10) == 1.0
    assert textvqa_accuracy("x,y", ["x y"] * 10) == 0.0
    # 3 of 10 say "Coca-Cola", prediction "coca cola": '-' becomes a space on both sides -> k = 3 -> 0.9
    assert textvqa_accuracy("coca cola", ["Coca-Cola"] * 3 + ["pepsi"] * 7) == pytest.approx(0.9)


# ------------------------------------------------------------------------------------------------ relaxed accuracy
# pix2struct relaxed_correctness: numbers (a trailing '%' divides by 100) within 5% of the target,
# |p - t| / |t| <= 0.05; otherwise a case-insensitive exact match.
RELAXED_CASES = [
    ("12", "12.5", 1.0),      # |12 - 12.5| / 12.5 = 0.04 <= 0.05
    ("11.8", "12.5", 0.0),    # 0.7 / 12.5 = 0.056 > 0.05
    ("105", "100", 1.0),      # exactly 5%: <= keeps it
    ("106", "100", 0.0),      # 6%
    ("45%", "0.45", 1.0),     # "45%" reads as 0.45: equal
    ("45%", "45", 0.0),       # 0.45 vs 45: off by 99%; the published parser does not match these
    ("45", "45%", 0.0),       # the same the other way round
    ("1,000", "1000", 0.0),   # float("1,000") fails: text comparison "1,000" != "1000"
    ("1000", "1,000", 0.0),   # the target is text then: "1000" != "1,000"
    ("1,000", "1,000", 1.0),  # same text
    ("Yes", "yes", 1.0),      # text, case-insensitive
    ("0", "0", 1.0),          # a zero target is compared as text
    ("0.0", "0", 0.0),        # ... so "0.0" is not "0"
    (" 12.5\n", "12.5", 1.0),  # surrounding whitespace dropped
    ("-10", "-10.4", 1.0),    # 0.4 / 10.4 = 0.038
]


@pytest.mark.parametrize("prediction,target,expected", RELAXED_CASES)
def test_relaxed_accuracy(prediction, target, expected):
    assert relaxed_accuracy(prediction, target) == expected


def test_relaxed_tolerance_keyword():
    assert relaxed_accuracy("12", "12.5", tolerance=0.01) == 0.0  # 4% > 1%
    assert relaxed_accuracy("11", "12.5", tolerance=0.15) == 1.0  # 1.5 / 12.5 = 12% <= 15%


# ------------------------------------------------------------------------------------------------ exact match
@pytest.mark.parametrize("prediction,answers,expected", [
    ("  Paris ", ["paris"], 1.0),       # stripped, lower-cased
    ("Paris.", ["paris"], 0.0),         # no punctuation handling
    ("the cat", ["cat"], 0.0),          # no article handling
    ("1,000", ["1000"], 0.0),           # no number handling
    ("dog", ["cat", "Dog"], 1.0),       # any answer
    ("dog", "dog", 1.0),                # a single answer as a string
])
def test_exact_match(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


# ------------------------------------------------------------------------------------------------ multiple choice
CHOICES = ["Paris", "London", "Berlin", "Madrid"]


@pytest.mark.parametrize("prediction,index", [
    ("(B)", 1),                                                    # letter in parentheses
    ("B", 1),                                                      # a bare letter: " B " after padding
    ("B.", 1),                                                     # end '.' stripped, then " B "
    ("The answer is C", 2),                                        # " C " inside a sentence
    ("The answer is C.", 2),                                       # the final period stripped first
    ("A. Paris", 0),                                               # " A." (lmms-eval's letter-and-period step)
    ("(A) or maybe (C)", 2),                                       # two in parentheses: the last one wins
    ("A cat? No, the answer is D", 3),                             # " A " and " D ": the last mentioned wins
    ("I am quite sure the capital is Berlin, not London at all", 1),  # > 5 words, both texts: "london" is last
    ("The city you are looking for is Madrid", 3),                 # > 5 words: the option's text
    ("Berlin", 2),                                                 # a short answer equal to an option's text
    ("berlin", 2),                                                 # ... compared case-insensitively
    ("Maybe", None),                                               # nothing to read
    ("the answer is d", None),                                     # letters are upper-case only; 4 words: no text step
    ("It is DNA. Definitely", None),                               # no space before "A.": not a letter answer
    ("Rome", None),                                                # not an option
])
def test_parse_choice(prediction, index):
    assert parse_choice(prediction, CHOICES) == index


def test_choice_accuracy():
    assert choice_accuracy("(B)", "B", CHOICES) == 1.0  # the answer as a letter
    assert choice_accuracy("(B)", "b", CHOICES) == 1.0  # ... in either case
    assert choice_accuracy("(B)", 1, CHOICES) == 1.0  # the answer as the option's index
    assert choice_accuracy("(B)", "A", CHOICES) == 0.0
    assert choice_accuracy("Maybe", "A", CHOICES) == 0.0  # unreadable: wrong (MMMU would guess)
    with pytest.raises(ValueError, match="letter among A, B, C, D"):
        choice_accuracy("(B)", "E", CHOICES)
    with pytest.raises(ValueError, match="out of range"):
        choice_accuracy("(B)", 4, CHOICES)


# ------------------------------------------------------------------------------------------------ boxes
@pytest.mark.parametrize("a,b,iou", [
    ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),        # identical
    ([0, 0, 2, 2], [3, 3, 4, 4], 0.0),        # disjoint
    ([0, 0, 2, 2], [2, 0, 4, 2], 0.0),        # touching along an edge: zero-width intersection
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),      # intersection 1, union 4 + 4 - 1 = 7
    ([0, 0, 2, 2], [0, 0, 2, 1], 0.5),        # intersection 2 (the smaller box), union 4
    ([0, 0, 10, 10], [0, 0, 10, 4.9], 0.49),  # intersection 49, union 100
    ([0, 0, 4, 4], [1, 1, 3, 3], 0.25),       # nested: 4 / 16
    ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),        # no area at all: no union, 0
])
def test_box_iou(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)


def test_iou_accuracy():
    assert iou_accuracy([0, 0, 2, 1], [0, 0, 2, 2]) == 1.0  # IoU exactly 0.5: counts (>=)
    assert iou_accuracy([0, 0, 10, 4.9], [0, 0, 10, 10]) == 0.0  # 0.49
    assert iou_accuracy([1, 1, 3, 3], [0, 0, 2, 2], threshold=0.1) == 1.0  # 1/7 = 0.14 >= 0.1
    assert iou_accuracy(None, [0, 0, 2, 2]) == 0.0  # no box in the answer


# ------------------------------------------------------------------------------------------------ registry, rows
def test_registry_names():
    assert {"anls", "vqa", "relaxed", "exact", "choice", "iou"} <= set(METRICS)
    for name, metric in METRICS.items():
        assert metric.name == name and callable(metric.function) and metric.needs and metric.description


def test_score_row():
    assert score_row("anls", "abcd", {"answers": ["abxd"]}) == pytest.approx(0.75)
    assert score_row("exact", "Paris", {"answer": "paris"}) == 1.0  # "answer" as a string
    assert score_row("vqa", "2", {"answers": _ten(3)}) == pytest.approx(0.9)
    assert score_row("textvqa", "2", {"answers": _ten(1)}) == pytest.approx(0.3)
    # relaxed: the best over several targets; 12 is 4% off 12.5, 20% off 10
    assert score_row("relaxed", "12", {"answer": ["10", "12.5"]}) == 1.0
    assert score_row("relaxed", "12", {"answer": ["10"]}) == 0.0
    assert score_row("relaxed", "12", {"answer": 12.5}) == 1.0  # a JSON number reads as its text
    assert score_row("choice", "(C)", {"answer": "C", "choices": CHOICES}) == 1.0
    assert score_row("choice", "(C)", {"answer": 2, "choices": CHOICES}) == 1.0
    assert score_row("iou", "ignored", {"bbox": [0, 0, 2, 2]}, box=[0, 0, 2, 1]) == 1.0  # IoU 0.5
    assert score_row("iou", "ignored", {"bbox": [0, 0, 2, 2]}) == 0.0  # no box parsed
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score_row("bleu", "x", {"answers": ["x"]})
    with pytest.raises(ValueError, match='"answers"'):
        score_row("anls", "x", {"question": "?"})
    with pytest.raises(ValueError, match='"choices"'):
        score_row("choice", "A", {"answer": "A"})
    with pytest.raises(ValueError, match='"bbox"'):
        score_row("iou", "x", {}, box=[0, 0, 1, 1])


def test_summarize():
    # [1, 0, 1, 1]: mean 3/4; deviations 1/4, -3/4, 1/4, 1/4 -> squares sum 3/4; sample variance (3/4) / 3 = 1/4,
    # sd 1/2; stderr (1/2) / sqrt(4) = 1/4; the interval 3/4 -/+ 1.96 * 1/4 = 0.26 .. 1.24 (normal, not clipped)
    out = summarize([1.0, 0.0, 1.0, 1.0])
    assert out["count"] == 4
    assert out["mean"] == pytest.approx(0.75)
    assert out["stderr"] == pytest.approx(0.25)
    assert out["ci95_low"] == pytest.approx(0.26, abs=1e-3)
    assert out["ci95_high"] == pytest.approx(1.24, abs=1e-3)
    # all equal: stderr 0, the interval collapses on the mean
    same = summarize([0.5] * 5)
    assert same["stderr"] == 0.0 and same["ci95_low"] == same["ci95_high"] == 0.5
    assert summarize([0.3]) == {"mean": 0.3, "count": 1, "stderr": None, "ci95_low": None, "ci95_high": None}
    assert summarize([]) == {"mean": None, "count": 0, "stderr": None, "ci95_low": None, "ci95_high": None}


# ------------------------------------------------------------------------------------------------ presets
def test_presets_match_their_sources():
    # lmms-eval 0.7.3: Qwen2_VL(min_pixels=3136, max_pixels=602112), Qwen2_5_VL(min_pixels=256*28*28, 1605632)
    for name, p in PRESETS.items():
        assert isinstance(p, Preset) and p.name == name and p.metric in METRICS and p.source
        assert name.startswith(p.family + "/")
        pixels = {"qwen2_vl": (3136, 602112), "qwen2_5_vl": (200704, 1605632)}[p.family]
        assert (p.min_pixels, p.max_pixels) == pixels
    docvqa = preset("qwen2_vl/docvqa")  # _default_template_docvqa_yaml: max_new_tokens 32, anls
    assert (docvqa.max_new_tokens, docvqa.metric) == (32, "anls")
    assert docvqa.render("What is the date?") == "What is the date?\nAnswer the question using a single word or phrase."
    assert preset("qwen2_5_vl/chartqa").max_new_tokens == 16  # chartqa.yaml
    assert preset("qwen2_vl/textvqa").max_new_tokens == 128  # no max_new_tokens in the yaml: Qwen2_VL's default
    assert preset("qwen2_5_vl/textvqa").max_new_tokens == 32768  # ... Qwen2_5_VL's default
    # textvqa_doc_to_text capitalises the question (str.capitalize lower-cases the rest)
    assert preset("qwen2_vl/textvqa").render("what is on the SIGN?").startswith("What is on the sign?\n")
    mmmu = preset("qwen2_vl/mmmu")
    assert mmmu.render("Which?", ["x", "y"]) == ("Which?\nA. x\nB. y\n\n"
                                                  "Answer with the option's letter from the given choices directly.")
    with pytest.raises(ValueError, match="choices"):
        mmmu.render("Which?")
    assert preset("qwen2_vl/refcoco").render("the red cup").endswith("this sentence describes: the red cup")


def test_preset_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        preset("docvqa")
    assert "qwen2_vl/docvqa" in str(error.value) and "qwen2_5_vl/mmmu" in str(error.value)


def test_presets_are_frozen():
    with pytest.raises(AttributeError):
        preset("qwen2_vl/docvqa").max_new_tokens = 1  # type: ignore[misc]
