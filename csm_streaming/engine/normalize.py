"""English text normalisation before tokenising: numbers, ordinals, money, times, symbols.

CSM reads digits and symbols poorly ("$3.50" comes out as gibberish more often than not), so
they are spelled out the way a person would say them. `normalize_text(text)` is applied by the
generators unless turned off (`normalize=False`, `--no-normalize`).
"""

from __future__ import annotations

import re

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORDINAL_WORDS = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}


def number_to_words(n: int) -> str:
    """0 <= n < 10**15 -> English words (no 'and'):
    1234 -> 'one thousand two hundred thirty-four'."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("-" + _ONES[ones] if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + (" " + number_to_words(rest) if rest else "")
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            return (
                number_to_words(head) + " " + name + (" " + number_to_words(rest) if rest else "")
            )
    raise ValueError(n)


def ordinal_words(n: int) -> str:
    words = number_to_words(n)
    head, _, last = words.rpartition(" ")
    if "-" in last:
        a, b = last.rsplit("-", 1)
        last = a + "-" + _ordinal_word(b)
    else:
        last = _ordinal_word(last)
    return (head + " " if head else "") + last


def _ordinal_word(w: str) -> str:
    if w in _ORDINAL_WORDS:
        return _ORDINAL_WORDS[w]
    if w.endswith("y"):
        return w[:-1] + "ieth"
    return w + "th"


def year_words(n: int) -> str:
    """1999 -> 'nineteen ninety-nine', 2005 -> 'two thousand five', 1900 -> 'nineteen hundred'."""
    if 2000 <= n <= 2009 or n % 1000 == 0:
        return number_to_words(n)
    hi, lo = divmod(n, 100)
    if lo == 0:
        return number_to_words(hi) + " hundred"
    return number_to_words(hi) + " " + (("oh " + _ONES[lo]) if lo < 10 else number_to_words(lo))


def _digits(s: str) -> str:
    return " ".join(_ONES[int(c)] for c in s)


def _decimal(whole: str, frac: str) -> str:
    return number_to_words(int(whole.replace(",", ""))) + " point " + _digits(frac)


_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
             "£": ("pound", "pounds", "penny", "pence")}
_ABBREVIATIONS = [
    (r"\bDr\.(?=\s+[A-Z])", "Doctor"),
    (r"\bMr\.", "Mister"),
    (r"\bMrs\.", "Missus"),
    (r"\bMs\.", "Miz"),
    (r"\bProf\.", "Professor"),
    (r"\bSt\.(?=\s+[A-Z])", "Saint"),
    (r"\bJr\.", "Junior"),
    (r"\bSr\.", "Senior"),
    (r"\be\.g\.", "for example"),
    (r"\bi\.e\.", "that is"),
    (r"\betc\.", "et cetera"),
    (r"\bvs\.?(?=\s)", "versus"),
    (r"\bapprox\.", "approximately"),
    (r"\bNo\.(?=\s*\d)", "number"),
]
_SYMBOLS = [
    ("&", " and "),
    ("@", " at "),
    ("+", " plus "),
    ("=", " equals "),
    ("°C", " degrees Celsius"),
    ("°F", " degrees Fahrenheit"),
    ("°", " degrees"),
    ("#", " number "),
    ("/", " slash "),
]


def _money(m: re.Match) -> str:
    sym, whole, cents, scale = m.group(1), m.group(2).replace(",", ""), m.group(3), m.group(4)
    one, many, cent_one, cent_many = _CURRENCY[sym]
    if scale:  # $2.5 million -> two point five million dollars
        amount = _decimal(whole, cents) if cents else number_to_words(int(whole))
        return f"{amount} {scale} {many}"
    n = int(whole)
    words = f"{number_to_words(n)} {one if n == 1 else many}"
    if cents and int(cents.ljust(2, "0")[:2]):
        c = int(cents.ljust(2, "0")[:2])
        words += f" and {number_to_words(c)} {cent_one if c == 1 else cent_many}"
    return words


def _time(m: re.Match) -> str:
    h, mnt, ampm = int(m.group(1)), int(m.group(2)), (m.group(3) or "").lower().replace(".", "")
    if h > 23 or mnt > 59:
        return m.group(0)
    hour = number_to_words(h)
    if mnt == 0:
        minutes = "o'clock" if not ampm else ""
    elif mnt < 10:
        minutes = "oh " + _ONES[mnt]
    else:
        minutes = number_to_words(mnt)
    out = " ".join(x for x in (hour, minutes, " ".join(ampm.upper()) if ampm else "") if x)
    rest = m.string[m.end():]
    if m.group(0).endswith(".") and (not rest.strip() or re.match(r"\s+[A-Z]", rest)):
        out += "."  # "p.m." ended the sentence too
    return out


def normalize_text(text: str) -> str:
    """Spell out what the model reads poorly. Idempotent on plain words."""
    t = text
    for pattern, repl in _ABBREVIATIONS:
        t = re.sub(pattern, repl, t)
    t = re.sub(
        r"([$€£])\s?(\d[\d,]*)(?:\.(\d+))?(?:\s+(thousand|million|billion|trillion)\b)?", _money, t
    )
    t = re.sub(r"\b(\d{1,2}):(\d{2})(?:\s*([AaPp]\.?[Mm]\.?))?", _time, t)
    t = re.sub(
        r"\b(\d+)(?:\.(\d+))?\s?%",
        lambda m: (
            (_decimal(m.group(1), m.group(2)) if m.group(2) else number_to_words(int(m.group(1))))
            + " percent"
        ),
        t,
    )
    t = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: ordinal_words(int(m.group(1))), t)
    t = re.sub(r"\b(1[1-9]\d\d|20\d\d)s\b", lambda m: _plural(year_words(int(m.group(1)))), t)
    t = re.sub(
        r"(?<![\d.,])\b(1[1-9]\d\d|20\d\d)\b(?![\d,.]\d)", lambda m: year_words(int(m.group(1))), t
    )
    t = re.sub(r"(?<![\d,])(-)?(\d{1,3}(?:,\d{3})+|\d+)\.(\d+)\b",
               lambda m: ("minus " if m.group(1) else "") + _decimal(m.group(2), m.group(3)), t)
    t = re.sub(r"(?<![\w,])(-)?(\d{1,3}(?:,\d{3})+|\d+)\b",
               lambda m: ("minus " if m.group(1) else "") + _cardinal(m.group(2)), t)
    for sym, word in _SYMBOLS:
        t = t.replace(sym, word)
    return re.sub(r"\s+", " ", t).strip()


def _cardinal(s: str) -> str:
    digits = s.replace(",", "")
    if len(digits) > 15:
        return _digits(digits)
    if len(digits) > 1 and digits.startswith("0"):  # 007, zip codes: read digit by digit
        return _digits(digits)
    return number_to_words(int(digits))


def _plural(words: str) -> str:
    last = words.rsplit(" ", 1)[-1]
    if last.endswith("y"):
        return words[:-1] + "ies"
    return words + "s"
