"""Text normalisation: a table of inputs and what must come out."""

import pytest

from csm_streaming.engine.normalize import normalize_text, number_to_words, ordinal_words

CASES = [
    ("I have 3 cats.", "I have three cats."),
    ("It costs $5.", "It costs five dollars."),
    ("It costs $3.50 today.", "It costs three dollars and fifty cents today."),
    ("Only $1 and £2.01.", "Only one dollar and two pounds and one penny."),
    ("A $2.5 million deal.", "A two point five million dollars deal."),
    ("That's €20.", "That's twenty euros."),
    ("Meet at 3:30 pm.", "Meet at three thirty P M."),
    ("Wake at 7:05.", "Wake at seven oh five."),
    ("At 9:15 a.m. we met.", "At nine fifteen A M we met."),
    ("It ends at 5:45 p.m. Then we go.", "It ends at five forty-five P M. Then we go."),
    ("It is 10:00.", "It is ten o'clock."),
    ("The 1st and 22nd and 103rd.", "The first and twenty-second and one hundred third."),
    ("She came 2nd, he was 11th.", "She came second, he was eleventh."),
    ("Growth was 45%.", "Growth was forty-five percent."),
    ("Pi is 3.14.", "Pi is three point one four."),
    ("In 1999 and 2024.", "In nineteen ninety-nine and twenty twenty-four."),
    ("Back in 2005.", "Back in two thousand five."),
    ("The 1980s were loud.", "The nineteen eighties were loud."),
    (
        "About 1,234,567 people.",
        "About one million two hundred thirty-four thousand five hundred sixty-seven people.",
    ),
    ("It was -5 degrees.", "It was minus five degrees."),
    ("Dr. Smith and Mr. Jones, etc.", "Doctor Smith and Mister Jones, et cetera"),
    ("Salt & pepper", "Salt and pepper"),
    ("Email me @ home", "Email me at home"),
    ("2 + 2 = 4", "two plus two equals four"),
    ("It's 25°C outside.", "It's twenty-five degrees Celsius outside."),
    ("Agent 007.", "Agent zero zero seven."),
    ("Plain words stay.", "Plain words stay."),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_normalize_table(text, expected):
    assert normalize_text(text) == expected


def test_number_words():
    assert number_to_words(0) == "zero"
    assert number_to_words(115) == "one hundred fifteen"
    assert number_to_words(2_000_001) == "two million one"
    assert ordinal_words(21) == "twenty-first" and ordinal_words(12) == "twelfth"
    assert ordinal_words(40) == "fortieth"


def test_idempotent():
    for text, _ in CASES:
        once = normalize_text(text)
        assert normalize_text(once) == once
