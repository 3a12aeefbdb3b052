"""Language Confusion Benchmark metrics (LPR, WPR, LCPR), worked by hand on lines whose language is plain."""

import pytest

from rayalign.eval.confusion import confusion_metrics, confusion_rows, response_errors

DE = "Heute ist ein schöner Tag und wir gehen in den Park spazieren"
DE2 = "Morgen fahren wir mit dem Zug nach Berlin zu unseren Freunden"
EN = "The weather is nice today and we are going for a walk"
RU = "Сегодня хорошая погода и мы идём гулять в парк"
RU_WORD = "Сегодня я купил новый computer и очень доволен своей покупкой"  # a Latin-script word: word-level error
RU_CAPS = "Наша компания выпустила новый API для разработчиков этой весной"  # uppercase: not counted (as the code)

GERMAN = [f"{DE}\n{DE2}", f"{DE}\n{EN}", "Ja, gut."]  # passes, line error, skipped (no line of >= 5 tokens)
RUSSIAN = [RU, RU_WORD, EN, RU_CAPS]  # passes, word error, line error, passes


def test_each_response_is_classified_as_the_paper_does():
    assert [response_errors(r, "de") for r in GERMAN] == [None, "line", "skipped"]
    assert [response_errors(r, "ru") for r in RUSSIAN] == [None, "word", "line", None]
    assert response_errors(f"{DE}!!!\n\n--- ok", "de") is None  # punctuation removed, short lines dropped
    assert response_errors(RU_WORD, "de") == "line"
    assert response_errors(f"{DE}\nQ: {EN}", "de") is None  # a base model's next few-shot question is cut


ZH = "今天天气很好我们一起去公园散步吧"
ZH_WORD = "今天我买了一台新的computer我非常满意这次购物"  # no spaces around the Latin word: still a word error
ZH_CAPS = "今天我们发布了新的API给开发者使用非常方便"
JA_WORD = "今日は新しいcomputerを買ってとても満足しています"


def test_latin_words_inside_unspaced_chinese_and_japanese_are_word_errors():
    assert [response_errors(r, "zh") for r in (ZH, ZH_WORD, ZH_CAPS)] == [None, "word", None]
    assert response_errors(JA_WORD, "ja") == "word"


def test_lpr_wpr_lcpr_by_hand():
    de = confusion_metrics(GERMAN, "de")
    # 2 responses kept, 1 with a line error: LPR = 1 - 1/2; WPR is not defined for Latin-script German: LCPR = LPR
    assert de == {"lpr": 0.5, "wpr": None, "lcpr": 0.5, "kept": 2, "clean": 1}
    ru = confusion_metrics(RUSSIAN, "ru")
    # 4 kept, 1 line error: LPR = 3/4; of the 3 without line errors 1 has a word error: WPR = 2/3;
    # LCPR = 2 * 3/4 * 2/3 / (3/4 + 2/3) = 1 / (17/12) = 12/17
    assert ru["lpr"] == 0.75 and ru["wpr"] == pytest.approx(2 / 3) and ru["lcpr"] == pytest.approx(12 / 17)
    assert (ru["kept"], ru["clean"]) == (4, 3)
    # the released code's denominators are max(1, n): no kept response gives LPR 1, and none free of line errors
    # gives WPR 1 (so LCPR = 2 LPR / (LPR + 1))
    assert confusion_metrics(["ok"], "ru") == {"lpr": 1.0, "wpr": 1.0, "lcpr": 1.0, "kept": 0, "clean": 0}
    assert confusion_metrics([EN, EN, RU_WORD + "\n" + EN], "ru") == {"lpr": 0.0, "wpr": 1.0, "lcpr": 0.0, "kept": 3,
                                                                     "clean": 0}


def test_rows_per_language_and_mean_over_languages():
    langs = ["de"] * len(GERMAN) + ["ru"] * len(RUSSIAN)
    rows = {(r["metric"], r["lang"]): (r["value"], r["count"]) for r in confusion_rows(langs, GERMAN + RUSSIAN)}
    assert rows[("lpr", "de")] == (0.5, 2) and ("wpr", "de") not in rows
    assert rows[("wpr", "ru")] == (pytest.approx(2 / 3), 3)
    assert rows[("lpr", "all")] == (pytest.approx((0.5 + 0.75) / 2), 6)
    assert rows[("wpr", "all")] == (pytest.approx(2 / 3), 3)  # only the languages where WPR is defined
    assert rows[("lcpr", "all")] == (pytest.approx((0.5 + 12 / 17) / 2), 6)
    assert all(r["stat"] == "share" for r in confusion_rows(langs, GERMAN + RUSSIAN))
