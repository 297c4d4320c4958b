"""Procedurally generated utility tasks: many small domains, one utility adapter per domain.

Each domain draws items (question, answer, 3 plausible distractors) from a seeded generator.
Items come in two forms: multiple choice in MMLU schema (`MCQuestion`, scored like MMLU) and
generative (`GenExample`: prompt → short answer, for LoRA training and exact-match scoring).

Train/test never overlap, by construction: an item's split is a hash of (domain, question),
fixed whatever the seed or the number of items asked for, so no seed can leak a test question
into training. Everything here is written for sst-jax (Apache-2.0); the fact tables
(capitals, antonyms, plurals) are common knowledge.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import numpy as np

from sst_jax.data.sources import GenExample, MCQuestion
from sst_jax.errors import DatasetError

SOURCE = "sst-jax:utility_tasks"
TEST_FRACTION_DENOMINATOR = 5  # 1 in 5 questions (by hash) is a test question

_WORDS = (
    "apple", "banana", "garden", "window", "river", "planet", "orange", "pencil", "school",
    "summer", "winter", "forest", "bridge", "castle", "dragon", "flower", "guitar", "island",
    "jacket", "kitten", "ladder", "marble", "number", "ocean", "pepper", "rabbit", "silver",
    "tomato", "valley", "yellow", "basket", "candle", "doctor", "engine", "finger", "hammer",
    "letter", "mirror", "needle", "pillow", "rocket", "saddle", "tunnel", "violin", "wallet",
    "bottle", "cookie", "butter", "carpet", "circle", "desert", "farmer", "helmet", "honey",
    "lemon", "melon", "monkey", "napkin", "parrot", "puzzle", "spider", "sunset", "teacher",
    "turtle", "velvet", "wizard", "zebra", "anchor", "beacon", "cactus", "falcon", "goblet",
    "harbor", "insect", "jungle", "kettle", "lizard", "meadow", "noodle", "oyster",
)

_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Australia", "Canberra"), ("Russia", "Moscow"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Turkey", "Ankara"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Ireland", "Dublin"), ("Netherlands", "Amsterdam"), ("Belgium", "Brussels"),
    ("Switzerland", "Bern"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Cuba", "Havana"), ("Colombia", "Bogota"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Morocco", "Rabat"), ("Czech Republic", "Prague"), ("Romania", "Bucharest"),
    ("Ukraine", "Kyiv"), ("New Zealand", "Wellington"), ("Philippines", "Manila"),
    ("Pakistan", "Islamabad"), ("Ethiopia", "Addis Ababa"), ("Venezuela", "Caracas"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"), ("Lithuania", "Vilnius"), ("Latvia", "Riga"), ("Estonia", "Tallinn"),
    ("Iceland", "Reykjavik"), ("Scotland", "Edinburgh"), ("Wales", "Cardiff"),
    ("Saudi Arabia", "Riyadh"), ("Qatar", "Doha"), ("Jordan", "Amman"), ("Lebanon", "Beirut"),
    ("Syria", "Damascus"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"),
    ("Bangladesh", "Dhaka"), ("Sri Lanka", "Colombo"), ("Malaysia", "Kuala Lumpur"),
    ("Singapore", "Singapore"), ("Mongolia", "Ulaanbaatar"), ("Uruguay", "Montevideo"),
    ("Paraguay", "Asuncion"), ("Bolivia", "La Paz"), ("Ecuador", "Quito"), ("Jamaica", "Kingston"),
    ("Senegal", "Dakar"), ("Tanzania", "Dodoma"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"),
    ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Libya", "Tripoli"), ("Sudan", "Khartoum"),
    ("Angola", "Luanda"), ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"),
)

_ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("up", "down"), ("open", "closed"), ("early", "late"), ("rich", "poor"), ("strong", "weak"),
    ("full", "empty"), ("hard", "soft"), ("high", "low"), ("long", "short"), ("new", "old"),
    ("wet", "dry"), ("young", "old"), ("loud", "quiet"), ("thick", "thin"), ("clean", "dirty"),
    ("heavy", "light"), ("cheap", "expensive"), ("easy", "difficult"), ("inside", "outside"),
    ("begin", "end"), ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("give", "take"),
    ("remember", "forget"), ("accept", "reject"), ("arrive", "depart"), ("friend", "enemy"),
    ("day", "night"), ("north", "south"), ("east", "west"), ("above", "below"),
    ("before", "after"), ("always", "never"), ("true", "false"), ("brave", "cowardly"),
    ("generous", "selfish"), ("ancient", "modern"), ("sweet", "sour"), ("smooth", "rough"),
)

_PLURALS = (
    ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("bus", "buses"), ("city", "cities"),
    ("baby", "babies"), ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"),
    ("child", "children"), ("man", "men"), ("woman", "women"), ("mouse", "mice"),
    ("goose", "geese"), ("tooth", "teeth"), ("foot", "feet"), ("person", "people"),
    ("sheep", "sheep"), ("fish", "fish"), ("deer", "deer"), ("potato", "potatoes"),
    ("hero", "heroes"), ("church", "churches"), ("dish", "dishes"), ("story", "stories"),
    ("party", "parties"), ("key", "keys"), ("toy", "toys"), ("life", "lives"), ("wife", "wives"),
    ("cactus", "cacti"), ("ox", "oxen"), ("brush", "brushes"), ("fox", "foxes"),
    ("lady", "ladies"), ("shelf", "shelves"), ("half", "halves"), ("class", "classes"),
    ("glass", "glasses"), ("watch", "watches"), ("house", "houses"), ("apple", "apples"),
    ("louse", "lice"), ("calf", "calves"), ("loaf", "loaves"), ("thief", "thieves"),
    ("tomato", "tomatoes"), ("echo", "echoes"), ("fly", "flies"), ("city", "cities"),
    ("country", "countries"), ("day", "days"), ("boy", "boys"), ("monkey", "monkeys"),
    ("bench", "benches"), ("wish", "wishes"), ("kiss", "kisses"), ("tax", "taxes"),
    ("photo", "photos"), ("piano", "pianos"), ("radio", "radios"), ("roof", "roofs"),
    ("chief", "chiefs"), ("crisis", "crises"), ("analysis", "analyses"),
    ("fungus", "fungi"), ("nucleus", "nuclei"), ("datum", "data"), ("medium", "media"),
    ("salmon", "salmon"), ("moose", "moose"), ("series", "series"), ("penny", "pennies"),
    ("puppy", "puppies"), ("berry", "berries"), ("journey", "journeys"), ("scarf", "scarves"),
)

# Word-based tasks draw from every word we have, for more distinct questions.
_ALL_WORDS = tuple(sorted(
    w for w in set(_WORDS) | {w for pair in _ANTONYMS + _PLURALS for w in pair}
    if w.isalpha() and len(w) >= 4 and w != w[::-1]))
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_UNITS = (  # (big unit, small unit, factor)
    ("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
    ("days", "hours", 24), ("weeks", "days", 7), ("feet", "inches", 12), ("yards", "feet", 3),
    ("dozens", "items", 12), ("centimeters", "millimeters", 10),
)


@dataclasses.dataclass(frozen=True)
class UtilityItem:
    """One task instance: the correct answer and three distinct wrong ones."""

    domain: str
    question: str
    answer: str
    distractors: tuple[str, str, str]


Draw = Callable[[np.random.Generator], tuple[str, str, list[str]]]


def _numeric_distractors(rng: np.random.Generator, answer: int, offsets=(1, 2, 10, 11, 9, 20),
                         low: int | None = 0) -> list[str]:
    """Plausible wrong numbers: off by one, by ten, digits swapped."""
    cands = [answer + s * o for o in offsets for s in (1, -1)]
    if answer >= 10:
        swapped = int(str(answer)[::-1])
        if swapped != answer:
            cands.append(swapped)
    cands = [c for c in cands if c != answer and (low is None or c >= low)]
    rng.shuffle(cands)
    return [str(c) for c in cands]


def _addition(rng):
    a, b = (int(x) for x in rng.integers(10, 100, size=2))
    return f"What is {a} + {b}?", str(a + b), _numeric_distractors(rng, a + b)


def _subtraction(rng):
    a, b = sorted((int(x) for x in rng.integers(10, 100, size=2)), reverse=True)
    return f"What is {a} - {b}?", str(a - b), _numeric_distractors(rng, a - b)


def _multiplication(rng):
    a, b = int(rng.integers(11, 100)), int(rng.integers(2, 10))
    return (f"What is {a} * {b}?", str(a * b),
            _numeric_distractors(rng, a * b, offsets=(b, a, 1, 10, 2 * b)))


def _doubling(rng):
    a = int(rng.integers(11, 500))
    return f"What is double {a}?", str(2 * a), _numeric_distractors(rng, 2 * a, offsets=(a, 1, 2, 10))


def _comparison(rng):
    a, b = (int(x) for x in rng.choice(np.arange(10, 100), size=2, replace=False))
    big = max(a, b)
    wrong = [str(min(a, b)), str(abs(a - b)), str(a + b), str(big + 1)]
    return f"Which number is larger, {a} or {b}?", str(big), wrong


def _parity(rng):
    a = int(rng.integers(10, 1000))
    ans = "even" if a % 2 == 0 else "odd"
    return f"Is {a} even or odd?", ans, [w for w in ("even", "odd", "both", "neither") if w != ans]


def _next_letter(rng):
    k = int(rng.integers(1, 6))
    after = bool(rng.random() < 0.5)
    i = int(rng.integers(0, 26 - k)) + (0 if after else k)
    target = i + k if after else i - k
    wrong = [_LETTERS[j % 26] for j in (target - 1, target + 1, i, target + 2, target - 2, 2 * i - target)
             if j % 26 != target]
    where = ("right " if k == 1 else f"{k} places ") + ("after" if after else "before")
    return f"Which letter comes {where} {_LETTERS[i]} in the alphabet?", _LETTERS[target], wrong


def _reverse_word(rng):
    w = str(rng.choice(_ALL_WORDS))
    ans = w[::-1]
    wrong = [w, w[1:][::-1] + w[0], ans[:-2] + ans[-1] + ans[-2], ans[1:] + ans[0]]
    wrong += ["".join(rng.permutation(list(ans))) for _ in range(6)]  # fallbacks for e.g. 'tooth'
    return f"What is the word '{w}' spelled backwards?", ans, wrong


def _word_length(rng):
    w = str(rng.choice(_ALL_WORDS))
    return (f"How many letters are in the word '{w}'?", str(len(w)),
            _numeric_distractors(rng, len(w), offsets=(1, 2, 3), low=1))


def _letter_count(rng):
    w = str(rng.choice(_ALL_WORDS))
    letter = str(rng.choice(sorted(set(w))))
    n = w.count(letter)
    return (f"How many times does the letter '{letter}' appear in '{w}'?", str(n),
            _numeric_distractors(rng, n, offsets=(1, 2, 3), low=0))


def _vowel_count(rng):
    w = str(rng.choice(_ALL_WORDS))
    n = sum(c in "aeiou" for c in w)
    return (f"How many vowels (a, e, i, o, u) are in the word '{w}'?", str(n),
            _numeric_distractors(rng, n, offsets=(1, 2, 3), low=0))


def _unit_conversion(rng):
    big, small, factor = _UNITS[int(rng.integers(len(_UNITS)))]
    k = int(rng.integers(2, 13))
    ans = k * factor
    wrong = [str(k * factor * 10), str(k * factor // 10 if factor >= 10 else k + factor),
             str(k + factor), str((k + 1) * factor)]
    return f"How many {small} are in {k} {big}?", str(ans), wrong


def _day_of_week(rng):
    d, k = int(rng.integers(7)), int(rng.integers(1, 20))
    ans = _DAYS[(d + k) % 7]
    wrong = [_DAYS[(d + k + 1) % 7], _DAYS[(d + k - 1) % 7], _DAYS[(d + k + 2) % 7], _DAYS[d]]
    return f"If today is {_DAYS[d]}, what day of the week will it be in {k} days?", ans, wrong


def _capitals(rng):
    i = int(rng.integers(len(_CAPITALS)))
    country, capital = _CAPITALS[i]
    others = [c for _, c in _CAPITALS if c != capital]
    wrong = [str(x) for x in rng.choice(others, size=4, replace=False)]
    return f"What is the capital of {country}?", capital, wrong


def _antonyms(rng):
    i = int(rng.integers(len(_ANTONYMS)))
    word, opposite = _ANTONYMS[i] if rng.random() < 0.5 else _ANTONYMS[i][::-1]
    pool = sorted({w for pair in _ANTONYMS for w in pair} - {word, opposite})
    wrong = [str(x) for x in rng.choice(pool, size=4, replace=False)]
    # A word with two listed opposites ("light", "old") has only one correct answer per item.
    wrong = [w for w in wrong if (word, w) not in _ANTONYMS and (w, word) not in _ANTONYMS]
    return f"What is the opposite of '{word}'?", opposite, wrong


def _plurals(rng):
    single, plural = _PLURALS[int(rng.integers(len(_PLURALS)))]
    wrong = [single + "s", single + "es", single + "en", single, plural + "s"]
    if single.endswith("y"):
        wrong.append(single[:-1] + "ies")
    return f"What is the plural of '{single}'?", plural, wrong


def _sort3(rng):
    nums = [int(x) for x in rng.choice(np.arange(1, 100), size=3, replace=False)]
    asc = sorted(nums)
    fmt = lambda xs: ", ".join(str(x) for x in xs)  # noqa: E731
    perms = [[asc[0], asc[2], asc[1]], [asc[1], asc[0], asc[2]], asc[::-1], [asc[2], asc[0], asc[1]]]
    return (f"Sort these numbers from smallest to largest: {fmt(nums)}.", fmt(asc),
            [fmt(p) for p in perms])


def _max_of_list(rng):
    nums = [int(x) for x in rng.choice(np.arange(1, 100), size=4, replace=False)]
    ordered = sorted(nums)
    wrong = [str(ordered[0]), str(ordered[1]), str(ordered[2]), str(ordered[3] + 1)]
    return (f"What is the largest number in this list: {', '.join(map(str, nums))}?",
            str(ordered[3]), wrong)


def _modular(rng):
    a, m = int(rng.integers(10, 100)), int(rng.integers(3, 10))
    ans = a % m
    wrong = [str((ans + d) % m) for d in (1, 2, m - 1)] + [str(a // m), str(m)]
    return f"What is the remainder when {a} is divided by {m}?", str(ans), wrong


def to_roman(n: int) -> str:
    table = ((400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"),
             (4, "IV"), (1, "I"))
    out = []
    for value, sym in table:
        while n >= value:
            out.append(sym)
            n -= value
    return "".join(out)


def _roman(rng):
    n = int(rng.integers(1, 400))
    ans = to_roman(n)
    wrong = [to_roman(k) for k in (n + 1, n - 1, n + 10, n - 10, n + 5) if k >= 1]
    wrong += ["I" * min(n, 5) + "X", ans + "I"]
    return f"How is the number {n} written in Roman numerals?", ans, wrong


def _time_arithmetic(rng):
    h, m = int(rng.integers(0, 24)), int(rng.choice(np.arange(0, 60, 5)))
    add = int(rng.choice(np.arange(5, 180, 5)))
    total = (h * 60 + m + add) % (24 * 60)
    fmt = lambda t: f"{(t // 60) % 24:02d}:{t % 60:02d}"  # noqa: E731
    start = h * 60 + m
    wrong = [fmt(total + 60), fmt(total - 60), fmt(total + 10), fmt(start + add // 2), fmt(total - 5)]
    return f"What time is it {add} minutes after {fmt(start)} (24-hour clock)?", fmt(total), wrong


def _alphabetical_first(rng):
    words = [str(w) for w in rng.choice(_WORDS, size=4, replace=False)]
    ans = min(words)
    wrong = [w for w in words if w != ans]
    return f"Which word comes first in alphabetical order: {', '.join(words)}?", ans, wrong


_DOMAINS: dict[str, Draw] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "doubling": _doubling,
    "comparison": _comparison,
    "parity": _parity,
    "next_letter": _next_letter,
    "reverse_word": _reverse_word,
    "word_length": _word_length,
    "letter_count": _letter_count,
    "vowel_count": _vowel_count,
    "unit_conversion": _unit_conversion,
    "day_of_week": _day_of_week,
    "capitals": _capitals,
    "antonyms": _antonyms,
    "plurals": _plurals,
    "sort3": _sort3,
    "max_of_list": _max_of_list,
    "modular": _modular,
    "roman_numerals": _roman,
    "time_arithmetic": _time_arithmetic,
    "alphabetical_first": _alphabetical_first,
}
UTILITY_DOMAINS: tuple[str, ...] = tuple(_DOMAINS)


def _domain_key(domain: str) -> int:
    return int.from_bytes(hashlib.sha256(domain.encode("utf-8")).digest()[:4], "big")


def item_split(domain: str, question: str) -> str:
    """'train' or 'test' for a question, from a hash: independent of seed and of n."""
    digest = hashlib.sha256(f"{domain}\x00{question}".encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_FRACTION_DENOMINATOR == 0 else "train"


def utility_items(domain: str, split: str, n: int, *, seed: int = 0) -> list[UtilityItem]:
    """n distinct items of `domain` in `split` ("train" or "test"), deterministic from seed."""
    if domain not in _DOMAINS:
        raise DatasetError(f"unknown utility domain {domain!r}; known: {', '.join(UTILITY_DOMAINS)}")
    if split not in ("train", "test"):
        raise DatasetError(f"utility split must be 'train' or 'test', got {split!r}")
    draw = _DOMAINS[domain]
    rng = np.random.default_rng([seed, _domain_key(domain)])
    items: list[UtilityItem] = []
    seen: set[str] = set()
    for _ in range(max(2000, 60 * n)):
        if len(items) == n:
            break
        question, answer, wrong = draw(rng)
        if question in seen or item_split(domain, question) != split:
            continue
        seen.add(question)
        distractors: list[str] = []
        for w in wrong:
            if w != answer and w not in distractors:
                distractors.append(w)
        if len(distractors) < 3:
            raise DatasetError(f"domain {domain!r} made fewer than 3 distractors for {question!r}")
        items.append(UtilityItem(domain, question, answer, tuple(distractors[:3])))
    if len(items) < n:
        raise DatasetError(f"domain {domain!r} has only {len(items)} distinct {split} items; "
                           f"asked for {n}")
    return items


def utility_mc(domain: str, split: str, n: int, *, seed: int = 0) -> list[MCQuestion]:
    """Items in MMLU schema: choices shuffled (seeded), answer = index of the correct one."""
    items = utility_items(domain, split, n, seed=seed)
    rng = np.random.default_rng([seed, 7919, _domain_key(domain)])
    out = []
    for item in items:
        choices = [item.answer, *item.distractors]
        order = rng.permutation(4)
        shuffled = tuple(choices[i] for i in order)
        out.append(MCQuestion(question=item.question, choices=shuffled,
                              answer=int(np.flatnonzero(order == 0)[0]), subject=domain,
                              source=SOURCE))
    return out


def utility_generative(domain: str, split: str, n: int, *, seed: int = 0) -> list[GenExample]:
    """Items as (prompt, short answer) pairs."""
    return [GenExample(prompt=item.question, response=item.answer, domain=domain, source=SOURCE)
            for item in utility_items(domain, split, n, seed=seed)]


def matches_answer(response: str, answer: str) -> bool:
    """Exact-match scoring of a generated answer: the first line, stripped of trailing
    punctuation and case, equals the answer."""
    lines = response.strip().splitlines()
    first = lines[0] if lines else ""
    return first.strip().rstrip(".!").strip().lower() == answer.strip().lower()
