"""Language Confusion Benchmark metrics (Marchisio et al., 2024, "Understanding and Mitigating Language
Confusion in LLMs", section 3 and its released compute_metrics.py), as rows of the `eval` schema.

Per response: cut at a next few-shot question ("\nQ:"), punctuation removed, split into lines; lines of fewer than 5 tokens are dropped and a response
left with no line is skipped. A response has a line-level error when some line's detected language is not the
expected one (detection probability <= 0.3 counts as unknown, an error); a word-level error when it has no
line-level error but holds a lowercase Latin-script word of more than 3 letters, checked only for the
non-Latin-script languages ar, hi, ja, ko, ru, zh.
  LPR  = 1 - |line errors| / max(1, |kept responses|)
  WPR  = 1 - |word errors| / max(1, |kept responses| - |line errors|)       (ar, hi, ja, ko, ru, zh only)
  LCPR = 2 LPR WPR / (LPR + WPR), the harmonic mean; LPR where WPR is not defined.
The max(1, .) is the released code's: an empty count reads as a perfect rate.
Differences from the released code: py3langid detects lines (not fastText lid.176); a word-level error is any
lowercase Latin-script word of more than 3 letters (not only those in an English word list); zh and ja lines
count characters as tokens and each run of Latin letters as a word (not jieba / MeCab words).
"""

from __future__ import annotations

import functools
import re
import string

import numpy as np

WORD_LEVEL_LANGS = ("ar", "hi", "ja", "ko", "ru", "zh")
MIN_TOKENS = 5
MIN_PROBABILITY = 0.3
_STRIP = str.maketrans({**{c: None for c in string.punctuation + "،"}, "—": " "})


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def line_language(line: str) -> str:
    lang, probability = _identifier().classify(line)
    return lang if probability > MIN_PROBABILITY else "unknown"


def _tokens(line: str, lang: str) -> list[str]:
    return [c for c in line if not c.isspace()] if lang in ("zh", "ja") else line.split()


def _latin_word(token: str) -> bool:
    return token.isascii() and token.isalpha() and token.islower() and len(token) > 3


def _words(line: str, lang: str) -> list[str]:
    """Words for the word-level check: zh and ja write no spaces, so each run of Latin letters is a word there
    (as jieba and MeCab split it out); other languages split on spaces."""
    return re.findall(r"[A-Za-z]+", line) if lang in ("zh", "ja") else line.split()


def response_errors(response: str, lang: str) -> str | None:
    """'skipped', 'line', 'word' or None (passes) for one response expected in `lang`. As the released code does,
    the response ends where a base model starts the next few-shot question ("\nQ:")."""
    response = response.split("\nQ:")[0].strip()
    lines = [line for line in response.translate(_STRIP).split("\n") if len(_tokens(line, lang)) >= MIN_TOKENS]
    if not lines:
        return "skipped"
    if any(line_language(line) != lang for line in lines):
        return "line"
    if lang in WORD_LEVEL_LANGS and any(_latin_word(t) for line in lines for t in _words(line, lang)):
        return "word"
    return None


def confusion_metrics(responses, lang: str) -> dict:
    """{lpr, wpr (None outside WORD_LEVEL_LANGS), lcpr, kept, clean}; as in the released code, an empty denominator
    counts as 1 (no kept response: LPR 1; none free of line errors: WPR 1)."""
    outcomes = [response_errors(r, lang) for r in responses]
    kept = sum(o != "skipped" for o in outcomes)
    clean = kept - outcomes.count("line")  # responses without line-level errors
    lpr = 1 - outcomes.count("line") / max(1, kept)
    wpr = 1 - outcomes.count("word") / max(1, clean) if lang in WORD_LEVEL_LANGS else None
    lcpr = lpr if wpr is None else (2 * lpr * wpr / (lpr + wpr) if lpr + wpr else 0.0)
    return {"lpr": lpr, "wpr": wpr, "lcpr": lcpr, "kept": kept, "clean": clean}


def confusion_rows(langs, responses) -> list[dict]:
    """lpr, wpr and lcpr rows (stat "share") per language, and for "all" the mean over the languages."""
    from rayalign.eval.metrics import row

    by_lang: dict[str, list[str]] = {}
    for lang, response in zip(langs, responses):
        by_lang.setdefault(lang, []).append(response)
    rows, per_lang = [], {}
    for lang in sorted(by_lang):
        m = per_lang[lang] = confusion_metrics(by_lang[lang], lang)
        rows += [row("lpr", "share", lang, m["lpr"], m["kept"]), row("lcpr", "share", lang, m["lcpr"], m["kept"])]
        if m["wpr"] is not None:
            rows.append(row("wpr", "share", lang, m["wpr"], m["clean"]))
    for metric, count in (("lpr", "kept"), ("wpr", "clean"), ("lcpr", "kept")):
        values = [(m[metric], m[count]) for m in per_lang.values() if m[metric] is not None]
        if values:
            rows.append(row(metric, "share", "all", np.mean([v for v, _ in values]), sum(n for _, n in values)))
    return rows
