"""The VQA benchmarks' answer normalisation: what predicted and human answers are reduced to before they are compared.

    normalize_answer("Two dogs.")          -> "2 dogs"        VQA v2 (vqaEval.py)
    normalize_answer("the cat")            -> "cat"
    normalize_answer("1,000")              -> "1000"
    normalize_textvqa_answer("x,y")        -> "xy"            TextVQA (EvalAI's processor: commas dropped first)

`normalize_answer` is the processing of the official VQA evaluation, `VQAEval` in GT-Vision-Lab/VQA
PythonEvaluationTools/vqaEvaluation/vqaEval.py (https://github.com/GT-Vision-Lab/VQA): newlines and tabs become
spaces and the ends are stripped, then `processPunctuation`, then `processDigitArticle`. Its tables (`PUNCTUATION`,
`NUMBER_WORDS`, `ARTICLES`, `CONTRACTIONS`) and both regexes are copied from that file as they are, quirks included:

  * `PERIOD_STRIP` is `(?!<=\\d)(\\.)(?!\\d)`: the `(?!<=\\d)` was meant as a look-behind but is a look-ahead for the
    text "<=" and a digit, so it never refuses; a period goes unless a digit follows it ("3.5" keeps its point,
    "yes." loses it). The official call passes `re.UNICODE` where `sub` takes its count, so at most 32 periods are
    removed; `_PERIOD_COUNT` keeps that.
  * `COMMA_STRIP` (a comma between two digits) is only searched for, never substituted: when it is found, every
    punctuation mark of the answer is deleted instead of turned into a space, which is what makes "1,000" -> "1000".
  * The apostrophe and the colon are not in the list: "it's" and "a: b" keep them.
  * `processDigitArticle` lower-cases before it looks words up, so the capitalised keys of `CONTRACTIONS` ("Im",
    "Ive", "Id've") never match; one entry maps the wrong way ("somebody'd" -> "somebodyd"). Both as in the original.

`normalize_textvqa_answer` is the processing TextVQA's evaluation uses: `EvalAIAnswerProcessor` of
facebookresearch/mmf (pythia/tasks/processors.py, which TextVQA's EvalAI server and the M4C `TextVQAAccuracyEvaluator`
run; lmms-eval's textvqa task calls the same class). It is the VQA processing above preceded by `word_tokenize`:
lower-case, delete every "," and "?", and split "'s" off as " 's". Its comma regex differs from vqaEval.py's
(`(?<=\\d)(\\,)+(?=\\d)`), but the commas are gone before it is searched for, so it never matches there.

Pure Python; `metrics.vqa_accuracy` compares the normalised strings.
"""

from __future__ import annotations

import re

__all__ = ["PUNCTUATION", "NUMBER_WORDS", "ARTICLES", "CONTRACTIONS", "PERIOD_STRIP", "COMMA_STRIP",
           "process_punctuation", "process_digit_article", "normalize_answer", "word_tokenize",
           "normalize_textvqa_answer"]

# vqaEval.py `self.punct` (its current version; an older one listed ':' and "'" too and lacked '{', '}', '-', '!')
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# vqaEval.py `self.manualMap`: the number words up to ten ("none" counts as zero)
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")  # vqaEval.py `self.articles`
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # vqaEval.py `self.periodStrip`, verbatim (see the docstring)
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py `self.commaStrip`
_PERIOD_COUNT = int(re.UNICODE)  # 32: vqaEval.py's `periodStrip.sub("", outText, re.UNICODE)` passes it as `count`

# vqaEval.py `self.contractions`, every entry as the file has it
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def process_punctuation(text: str) -> str:
    """vqaEval.py `processPunctuation`: each mark in `PUNCTUATION` is deleted where the answer has it next to a space
    (or has a digit-comma-digit anywhere), else turned into a space; then periods not followed by a digit go."""
    out = text
    digit_comma = COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        # the test reads the input, the replacement the output so far: as the original
        if mark + " " in text or " " + mark in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.py `processDigitArticle`: lower-case, split on whitespace, number words -> digits, drop the articles,
    restore the apostrophe of a contraction written without one ("dont" -> "don't"), join with single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """An answer as the official VQA evaluation compares it (vqaEval.py's processing of the predicted answer)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def word_tokenize(text: str) -> str:
    """mmf `EvalAIAnswerProcessor.word_tokenize`: lower-case, delete "," and "?", "'s" -> " 's", strip."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def normalize_textvqa_answer(text: str) -> str:
    """An answer as TextVQA's evaluation compares it: mmf `EvalAIAnswerProcessor.__call__` (`word_tokenize`, then
    the VQA processing)."""
    return normalize_answer(word_tokenize(text))
