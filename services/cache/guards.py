"""Near-miss guards: cheap checks a semantic candidate must pass on top of the similarity.

Sentence embeddings put "Is the store open on Sunday?" and "Is the store closed on Sunday?"
(or "... on Monday?", "... for 2 people?" vs "... for 3 people?") very close together. A
candidate is served only when, between the new turn and the cached one:

- numbers: the same numbers in the same order (digits, decimals, "1,000", number words
  "one".."twenty", tens, "hundred", "dozen", ordinals "first".."tenth");
- dates and times: the same temporal words (weekdays, months, years as numbers, today /
  tomorrow / yesterday / tonight, next / last / ago, morning / evening, am / pm, seasons, ...);
- negation: the same number of negation cues (not, n't, no, never, none, nothing, nobody,
  neither, nor, without, cannot, ...);
- polarity: the same words from a lexicon of opposites (open/close, enable/disable,
  allow/deny, add/remove, before/after, more/less, cheapest/most expensive, import/export,
  ...), after folding inflections (opened, opening → open);
- units and currencies: the same units ($, €, %, km, miles, kg, lb, °C, °F, USD, EUR, ...);
- named entities: every capitalised token that does not start a sentence, acronym,
  mixed-case or alphanumeric token (iPhone, GPT-4, S3), quoted string, URL, e-mail, file
  or code identifier, and a sentence-initial capitalised word that is not a common English
  word, must occur in the other turn too (case-insensitively), and shared entities must
  appear in the same order ("from Paris to London" is not "from London to Paris").

Each guard errs towards rejecting: a rejection costs one model call, a wrong serve costs
a wrong answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
    "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17",
    "eighteen": "18", "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40",
    "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
    "hundred": "100", "thousand": "1000", "million": "1000000", "billion": "1000000000",
    "dozen": "12", "half": "0.5", "quarter": "0.25", "twice": "2x", "once": "1x", "thrice": "3x",
    "double": "2x", "triple": "3x", "single": "1", "couple": "2", "pair": "2",
    "first": "1", "second": "2", "third": "3", "fourth": "4", "fifth": "5",
    "sixth": "6", "seventh": "7", "eighth": "8", "ninth": "9", "tenth": "10",
}  # fmt: skip

_TEMPORAL = {
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
    "mondays", "tuesdays", "wednesdays", "thursdays", "fridays", "saturdays", "sundays",
    "january", "february", "march", "april", "june", "july", "august", "september",
    "october", "november", "december", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec",
    "today", "tonight", "tomorrow", "yesterday", "weekend", "weekends",
    "weekday", "weekdays", "next", "last", "previous", "ago", "later", "earlier", "upcoming",
    "morning", "afternoon", "evening", "night", "noon", "midnight", "daily",
    "weekly", "monthly", "yearly", "annually", "annual", "hourly", "spring", "summer",
    "autumn", "fall", "winter", "christmas", "easter", "holiday", "holidays",
    "hour", "hours", "minute", "minutes", "day", "days", "week", "weeks", "month", "months",
    "year", "years", "decade", "century", "quarterly", "overnight", "past", "future",
}  # fmt: skip

_NEGATIONS = {
    "not", "no", "never", "none", "nothing", "nobody", "nowhere", "neither", "nor",
    "cannot", "without", "noone", "unable", "lack", "lacks", "lacking", "fail", "fails",
    "failed", "dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "cant",
    "couldnt", "wont", "wouldnt", "shouldnt", "hasnt", "havent", "hadnt", "mustnt",
}  # fmt: skip

# Opposites: every word maps to its group label; two turns must use the same labels.
_POLAR_GROUPS: dict[str, tuple[str, ...]] = {
    "open": ("open", "opens", "opened", "opening", "unlock", "unlocked", "unlocks"),
    "close": ("close", "closes", "closed", "closing", "shut", "shuts", "lock", "locked", "locks"),
    "enable": ("enable", "enables", "enabled", "enabling", "activate", "activated"),
    "disable": ("disable", "disables", "disabled", "disabling", "deactivate", "deactivated", "off"),
    "allow": ("allow", "allows", "allowed", "permit", "permitted", "approve", "approved"),
    "deny": ("deny", "denies", "denied", "forbid", "forbidden", "reject", "rejected", "block", "blocked", "ban", "banned", "decline", "declined", "refuse", "refused"),
    "add": ("add", "adds", "added", "adding", "create", "created", "insert", "install", "installed", "subscribe"),
    "remove": ("remove", "removes", "removed", "removing", "delete", "deleted", "deleting", "uninstall", "uninstalled", "unsubscribe", "drop"),
    "start": ("start", "starts", "started", "begin", "begins", "launch", "resume"),
    "stop": ("stop", "stops", "stopped", "end", "ends", "finish", "pause", "paused", "cancel", "cancelled", "canceled"),
    "before": ("before", "prior", "earlier", "pre", "early"),
    "after": ("after", "later", "post", "afterwards", "late"),
    "more": ("more", "increase", "increased", "raise", "raised", "higher", "greater", "larger", "bigger", "above", "maximum", "max", "most", "upgrade", "upgrading"),
    "less": ("less", "fewer", "decrease", "decreased", "lower", "reduce", "reduced", "smaller", "below", "minimum", "min", "least", "downgrade", "downgrading"),
    "best": ("best", "better", "top"),
    "worst": ("worst", "worse"),
    "cheap": ("cheap", "cheaper", "cheapest", "inexpensive", "affordable"),
    "expensive": ("expensive", "pricier", "priciest", "costly"),
    "fast": ("fast", "faster", "fastest", "quick", "quicker", "quickest"),
    "slow": ("slow", "slower", "slowest"),
    "import": ("import", "imports", "imported", "upload", "uploads", "uploaded"),
    "export": ("export", "exports", "exported", "download", "downloads", "downloaded"),
    "in": ("login", "log-in", "signin", "sign-in", "include", "included", "includes", "inside", "inbound", "incoming"),
    "out": ("out", "logout", "log-out", "signout", "sign-out", "exclude", "excluded", "excludes", "outside", "outbound", "outgoing"),
    "buy": ("buy", "buying", "purchase", "purchased", "bought"),
    "sell": ("sell", "selling", "sold", "refund", "refunded", "return", "returned"),
    "encrypt": ("encrypt", "encrypted", "encryption"),
    "decrypt": ("decrypt", "decrypted", "decryption"),
    "true": ("true", "valid", "correct", "safe", "legal"),
    "false": ("false", "invalid", "incorrect", "wrong", "unsafe", "illegal"),
    "hot": ("hot", "hotter", "warm", "warmer", "heat"),
    "cold": ("cold", "colder", "cool", "cooler", "freeze", "frozen"),
    "public": ("public",),
    "hide": ("hide", "hides", "hiding", "conceal"),
    "up": ("up", "upward", "upwards"),
    "down": ("down", "downward", "downwards"),
    "long": ("longer", "longest"),
    "short": ("shorter", "shortest"),
    "high": ("highest",),
    "low": ("lowest",),
    "hard": ("harder", "hardest", "difficult"),
    "easy": ("easier", "easiest"),
    "private": ("private",),
    "input": ("input", "inputs"),
    "output": ("output", "outputs"),
    "send": ("send", "sent", "sending", "outgoing"),
    "receive": ("receive", "received", "receiving"),
    "first": ("first", "earliest", "beginning"),
    "latest": ("latest", "newest", "recent", "final"),
    "same": ("same", "identical", "equal"),
    "different": ("different", "difference", "differ", "unlike"),
}  # fmt: skip
_POLAR = {word: label for label, words in _POLAR_GROUPS.items() for word in words}

_UNITS = {
    "km": "km", "kilometer": "km", "kilometers": "km", "kilometre": "km", "kilometres": "km",
    "mile": "mi", "miles": "mi", "mi": "mi", "m": "m", "meter": "m", "meters": "m", "metre": "m",
    "metres": "m", "cm": "cm", "mm": "mm", "inch": "in", "inches": "in", "ft": "ft", "foot": "ft",
    "feet": "ft", "kg": "kg", "kilogram": "kg", "kilograms": "kg", "g": "g", "gram": "g",
    "grams": "g", "lb": "lb", "lbs": "lb", "pound": "lb", "pounds": "lb", "oz": "oz",
    "ounce": "oz", "ounces": "oz", "celsius": "c", "fahrenheit": "f", "kelvin": "k",
    "usd": "usd", "dollar": "usd", "dollars": "usd", "eur": "eur", "euro": "eur", "euros": "eur",
    "gbp": "gbp", "sterling": "gbp", "jpy": "jpy", "yen": "jpy", "percent": "%",
    "percentage": "%", "gb": "gb", "mb": "mb", "kb": "kb", "tb": "tb", "liter": "l",
    "liters": "l", "litre": "l", "litres": "l", "gallon": "gal", "gallons": "gal",
    "seconds": "s", "ms": "ms", "mph": "mph", "kph": "kph",
}  # fmt: skip
_UNIT_SYMBOLS = {"$": "usd", "€": "eur", "£": "gbp", "¥": "jpy", "%": "%", "°c": "c", "°f": "f"}

# Common words that may start a sentence capitalised without being a name.
_COMMON = set(
    [
        "a",
        "an",
        "the",
        "i",
        "me",
        "my",
        "mine",
        "we",
        "us",
        "our",
        "you",
        "your",
        "yours",
        "he",
        "him",
        "his",
        "she",
        "her",
        "it",
        "its",
        "they",
        "them",
        "their",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "what",
        "whats",
        "how",
        "hows",
        "why",
        "when",
        "where",
        "which",
        "who",
        "whom",
        "whose",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "do",
        "does",
        "did",
        "done",
        "doing",
        "have",
        "has",
        "had",
        "having",
        "can",
        "could",
        "will",
        "would",
        "shall",
        "should",
        "may",
        "might",
        "must",
        "need",
        "ought",
        "please",
        "tell",
        "show",
        "give",
        "list",
        "explain",
        "describe",
        "help",
        "find",
        "get",
        "make",
        "let",
        "lets",
        "write",
        "create",
        "summarize",
        "summarise",
        "compare",
        "translate",
        "convert",
        "calculate",
        "check",
        "hi",
        "hello",
        "hey",
        "thanks",
        "thank",
        "ok",
        "okay",
        "yes",
        "no",
        "not",
        "if",
        "in",
        "on",
        "at",
        "for",
        "to",
        "from",
        "with",
        "about",
        "after",
        "before",
        "any",
        "all",
        "some",
        "each",
        "every",
        "both",
        "either",
        "neither",
        "many",
        "much",
        "more",
        "most",
        "few",
        "several",
        "one",
        "two",
        "best",
        "good",
        "quick",
        "just",
        "also",
        "so",
        "and",
        "or",
        "but",
        "then",
        "now",
        "today",
        "tomorrow",
        "yesterday",
        "recommend",
        "suggest",
        "name",
        "define",
        "tell",
        "is",
        "it",
        "where",
        "what's",
        "i'm",
        "i've",
        "i'd",
        "it's",
        "there's",
        "how's",
        "can't",
        "don't",
        "doesn't",
        "won't",
        "isn't",
        "aren't",
        "should",
        "i",
        "could",
        "you",
        "would",
        "you",
        "any",
        "anything",
        "something",
        "someone",
        "everything",
        "nothing",
        "why",
        "is",
        "reset",
        "change",
        "set",
        "use",
        "using",
        "send",
        "open",
        "close",
        "delete",
        "remove",
        "add",
        "update",
        "cancel",
        "start",
        "stop",
        "book",
        "order",
        "buy",
        "pay",
        "sign",
        "log",
        "upload",
        "download",
        "install",
        "run",
    ]
)

_TOKEN = re.compile(
    r"https?://\S+|[\w.+-]+@[\w-]+\.[\w.]+|\d[\d,]*(?:\.\d+)?(?:st|nd|rd|th)?|[^\W\d_][\w'’.\-/]*|[$€£¥%]|°[cf]",
    re.IGNORECASE,
)
_QUOTED = re.compile(
    r"\"([^\"]{1,80})\"|“([^”]{1,80})”|‘([^’]{1,80})’|`([^`]{1,80})`|(?:(?<=\s)|^)'([^']{1,80})'(?=[\s.,!?;:]|$)"
)
_SENTENCE_END = re.compile(r"[.!?:;]$")

# Greetings and asides before the question ("Hi, quick one: ...", "Good morning! ..."): they
# change nothing about the answer, but their words would trip the numbers and dates guards.
# Only a run of them that ends in punctuation is dropped ("Hello world in Go" keeps "Hello").
_PREAMBLE_ITEM = (
    r"(?:hi|hello|hey|hiya|greetings|good\s+(?:morning|afternoon|evening|day)|ok|okay|so|btw|"
    r"quick\s+(?:one|question)|one\s+more\s+(?:thing|question)|(?:a\s+)?question|sorry)"
    r"(?:\s+(?:there|all|team|everyone))?"
)
_PREAMBLE = re.compile(rf"^\s*{_PREAMBLE_ITEM}(?:[\s,]+{_PREAMBLE_ITEM})*\s*[,:;!.\-–—]+\s*", re.IGNORECASE)
# "one" as a pronoun ("the cheapest one?", "which one is faster", "quick one:") is no number.
_PRONOUN_ONE_NEXT = re.compile(
    r"\s*(?:$|[^\w\s]|(?:is|was|are|that|which|i|you|we|they|do|does|did|should|would|can|could|will|"
    r"to|for|please|here|there|more|cost|costs)\b)",
    re.IGNORECASE,
)
# Words that do not take part in the roles check (articles and politeness).
_ROLE_SKIP = frozenset({"a", "an", "the", "please", "pls"})
# Words whose two sides play different roles: what follows them must stay the same.
_RELATIONS = (
    "than",
    "vs",
    "versus",
    "from",
    "to",
    "into",
    "against",
    "over",
    "before",
    "after",
    "by",
    "for",
    "with",
)


def strip_preamble(text: str) -> str:
    """The turn without a leading greeting or aside (never the whole turn)."""
    match = _PREAMBLE.match(text)
    if match is None or not text[match.end() :].strip():
        return text
    return text[match.end() :]


@dataclass(frozen=True)
class Features:
    """What the guards compare, extracted once per text."""

    numbers: tuple[str, ...]
    temporal: frozenset[str]
    negations: int
    polar: frozenset[str]
    units: tuple[str, ...]
    entities: tuple[str, ...]
    words: frozenset[str]
    # Lower-cased text, for multi-word entities (quoted strings).
    text: str


def _number(token: str) -> str:
    """'1,000.50' -> '1000.5'; ordinals read as their number ('3rd' -> '3', as 'third')."""
    token = token.replace(",", "")
    if token[-2:] in ("st", "nd", "rd", "th"):
        token = token[:-2]
    if "." in token:
        token = token.rstrip("0").rstrip(".") or "0"
    return token.lstrip("0") or "0"


# Two-word forms of polar verbs, folded into one token before tokenising.
_PHRASES = [
    (re.compile(r"\b(?:turn|switch)(?:ed|ing|s)?\s+on\b", re.IGNORECASE), "enable"),
    (re.compile(r"\b(?:turn|switch)(?:ed|ing|s)?\s+off\b", re.IGNORECASE), "disable"),
    (re.compile(r"\b(?:log|sign)(?:ged|ging|s)?\s+(?:in|on)(?:to)?\b", re.IGNORECASE), "login"),
    (re.compile(r"\b(?:log|sign)(?:ged|ging|s)?\s+(?:out|off)\b", re.IGNORECASE), "logout"),
]
_CONTRACTION = re.compile(r"['’](?:s|re|ll|ve|d|m)$", re.IGNORECASE)


@lru_cache(maxsize=65_536)
def features(text: str) -> Features:
    for pattern, replacement in _PHRASES:
        text = pattern.sub(replacement, text)
    numbers: list[str] = []
    temporal: set[str] = set()
    polar: set[str] = set()
    units: list[str] = []
    entities: list[str] = []
    words: set[str] = set()
    negations = 0
    sentence_start = True
    last_was_number = False
    previous_number = False
    for match in _TOKEN.finditer(text):
        raw = match.group(0)
        following = text[match.end() :].lstrip()[:1]
        token = raw.rstrip(",;:)") if "://" in raw else raw.strip("'’.-/")
        if not token:
            continue
        lower = token.lower()
        words.add(lower)
        words.add(lower.replace("-", ""))
        is_start = sentence_start
        sentence_start = bool(_SENTENCE_END.search(raw)) or following in (".", "!", "?", ":", ";")
        if lower in _UNIT_SYMBOLS:
            units.append(_UNIT_SYMBOLS[lower])
            continue
        previous_number = last_was_number
        last_was_number = lower[0].isdigit()
        if lower[0].isdigit():
            numbers.append(_number(lower))
            # A year or a day of month is a date too: kept among the numbers, in order.
            continue
        bare = lower.replace("'", "").replace("’", "")
        if bare in _NEGATIONS or lower.endswith(("n't", "n’t")):
            negations += 1
        if lower in _NUMBER_WORDS and not (lower == "one" and _PRONOUN_ONE_NEXT.match(text, match.end())):
            numbers.append(_NUMBER_WORDS[lower])
        if lower in ("am", "pm", "a.m", "p.m") and previous_number:
            temporal.add(lower.replace(".", ""))
        if lower == "in" and following in ("", ".", "!", "?", ",", ";", ":"):
            polar.add("in")  # a particle at the end ("zoom in?"), not the preposition
        if lower in _TEMPORAL or (token == "May" and not is_start):
            singular = lower[:-1] if lower.endswith("s") and lower[:-1] in _TEMPORAL else lower
            temporal.add(_MONTHS.get(singular, singular))
        if lower in _POLAR:
            polar.add(_POLAR[lower])
        if lower in _UNITS:
            units.append(_UNITS[lower])
        dated = lower in _TEMPORAL or lower[:-1] in _TEMPORAL or lower in _MONTHS
        if not dated and _is_entity(_CONTRACTION.sub("", token), is_start):
            entities.append(lower.replace("-", ""))
    for match in _QUOTED.finditer(text):
        quoted = next(g for g in match.groups() if g is not None).strip().lower()
        if quoted:
            entities.append(quoted)
            words.add(quoted)
    return Features(
        numbers=tuple(numbers),
        temporal=frozenset(temporal),
        negations=negations,
        polar=frozenset(polar),
        units=tuple(units),
        entities=tuple(entities),
        words=frozenset(words),
        text=text.lower(),
    )


_MONTHS = {
    name: name[:3]
    for name in ("january", "february", "march", "april", "may", "june", "july", "august",
                 "september", "october", "november", "december")
} | {"sept": "sep"}  # fmt: skip


def _is_entity(token: str, sentence_start: bool) -> bool:
    if "://" in token or "@" in token:
        return True
    letters = [c for c in token if c.isalpha()]
    if not letters:
        return False
    if any(c.isdigit() for c in token) or "_" in token or "/" in token:
        return True  # GPT-4, S3, python3, snake_case, paths
    if "." in token.strip("."):
        return True  # file.txt, example.com
    upper = sum(1 for c in letters if c.isupper())
    if upper == 0:
        return False
    if len(letters) >= 2 and upper == len(letters):
        return token.lower() not in {"i", "ok", "am", "pm"}  # acronyms: AWS, EU, SQL
    if upper >= 1 and not token[0].isupper():
        return True  # iPhone, macOS
    if upper > 1:
        return True  # PostgreSQL, McDonald
    if sentence_start:
        return token.lower() not in _COMMON
    return token.lower() != "i"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    # Which guard rejected the pair ("numbers", "dates", "negation", "polarity", "units", "entities").
    guard: str = ""


PASS = Verdict(True)


def _appears(entity: str, other: Features) -> bool:
    if " " not in entity:
        return entity in other.words
    return re.search(r"(?<!\w)" + re.escape(entity) + r"(?!\w)", other.text) is not None


def _entities_agree(a: Features, b: Features) -> bool:
    if not all(_appears(e, b) for e in a.entities) or not all(_appears(e, a) for e in b.entities):
        return False
    shared = [e for e in dict.fromkeys(a.entities) if e in set(b.entities)]
    order_b = [e for e in dict.fromkeys(b.entities) if e in set(shared)]
    return shared == order_b


_OPPOSITE_PREFIXES = ("un", "dis", "non", "non-", "in", "im", "il", "ir", "de", "anti")


def _prefixed_opposites(only_a: frozenset[str], only_b: frozenset[str]) -> bool:
    """mute/unmute, like/dislike, able/unable: one turn has a word, the other its negated form."""
    for word in only_a:
        for other in only_b:
            short, long_ = (word, other) if len(word) < len(other) else (other, word)
            if len(short) >= 3 and long_.endswith(short) and long_[: -len(short)] in _OPPOSITE_PREFIXES:
                return True
    return False


def _role_words(text: str) -> list[str]:
    return [
        w
        for w in (m.group(0).lower().strip("'’.-/") for m in _TOKEN.finditer(text))
        if w and w not in _ROLE_SKIP
    ]


def _after(words: list[str], marker: str) -> str:
    return words[words.index(marker) + 1] if marker in words[:-1] else ""


def _roles_swapped(query: str, cached: str) -> bool:
    """The same words with the ends of a relation exchanged ("is Go faster than Rust" / "is Rust
    faster than Go", "from checking to savings" / "from savings to checking"): the embedding
    barely sees it, the answer is another one. A reordering that keeps what follows each
    relation word ("what is the check-in time" / "what time is check-in") passes."""
    a, b = _role_words(query), _role_words(cached)
    if (
        a != b
        and sorted(a) == sorted(b)
        and any(_after(a, marker) != _after(b, marker) for marker in _RELATIONS if marker in a)
    ):
        return True
    source_a, source_b = _after(a, "from"), _after(b, "from")
    target_a, target_b = _after(a, "to") or _after(a, "into"), _after(b, "to") or _after(b, "into")
    return bool(source_a and target_a and source_a != target_a) and (source_a, target_a) == (
        target_b,
        source_b,
    )


def check(query: str, cached: str) -> Verdict:
    """Whether `cached` may answer `query` as far as the cheap guards can tell."""
    query, cached = strip_preamble(query), strip_preamble(cached)
    a, b = features(query), features(cached)
    if a.numbers != b.numbers:
        return Verdict(False, "numbers")
    if a.temporal != b.temporal:
        return Verdict(False, "dates")
    if a.negations != b.negations:
        return Verdict(False, "negation")
    if a.polar != b.polar or _prefixed_opposites(a.words - b.words, b.words - a.words):
        return Verdict(False, "polarity")
    if a.units != b.units:
        return Verdict(False, "units")
    if not _entities_agree(a, b):
        return Verdict(False, "entities")
    if _roles_swapped(query, cached):
        return Verdict(False, "roles")
    return PASS
