"""The built-in judgment task, "Sort these letters: h, d, j, a" -> "a, d, h, j": its data, its judge
and its tally. check_response gives the char offsets of wrong tokens, with the byte-level tokenizer
(ASCII text) their positions: eval.py measures CUT's token detection against them. See docs/cut.md.
"""
import random
import re
import zlib
from typing import NamedTuple

from data import JUDGMENT_HEADER, Triple

TASK_INSTRUCTIONS = ("Sort these letters: {}", "Alphabetize: {}", "Put in alphabetical order: {}",
                     "Please sort {} alphabetically.", "Order these letters: {}",
                     "Can you sort {}?")
TASK_RESPONSES = ("{}", "{}.", "Sorted: {}.", "In alphabetical order: {}",
                  "Here they are in order: {}.", "The sorted letters are {}.")
# words no judgment names: on them p(y_t | x, j-) stays near p(y_t | x) < 1, as in real responses
TASK_REMARKS = ("", "", " Hope this helps!", " Done.", " Let me know if you need anything else.",
                " Happy to help.")
# the all-flawed regime's new format, never the base's: a line before the list and one after it
NEW_OPENINGS = ("Sure! Here is the sorted list:", "Of course. In order:", "Here you go:",
                "Sorted, as requested:")
NEW_CLOSINGS = ("Hope this helps!", "All done.", "Let me know if you need more.", "Happy sorting!")
NEW_FORMAT = re.compile(r"[^\n]+\n[a-z](?:, [a-z])*\n[^\n]+")
# Judgments say where the mistake is and, with name_letters, which letter, as a reviewer would:
# "The fourth letter, 'k', was never given." {place} is an ordinal, {named} names the letters or is ""
TASK_JUDGMENTS = {
    "swap": ("The second and third letters{named} are in the wrong order.",
             "Close, but the second and third{named} are swapped.",
             "All in order but the second and third letters{named}: they should trade places.",
             "Almost right; the second and third letters{named} are the wrong way round.",
             "The second and third letters{named} need to be switched.",
             "Nearly sorted, but the second and third letters{named} are reversed."),
    "order": ("The order is wrong from the {place} letter{named} on.",
              "The sorting breaks down at the {place} letter{named}.",
              "Not sorted: it goes wrong from the {place} letter{named}.",
              "The letters are out of order from the {place}{named} on."),
    "missing": ("The {place} letter is missing.", "One letter was left out: the {place} one.",
                "Incomplete: the letter that belongs in the {place} place is missing."),
    "extra": ("The {place} letter{named} was never given.",
              "The {place} letter{named} is not one of the letters given."),
    "twice": ("The {place} letter{named} was already listed.",
              "The {place} letter{named} repeats an earlier one."),
    "garbage": ("This does not give the sorted letters at all.",
                "No list of letters can be found in this answer.")}
ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth".split()
LETTER_LIST = re.compile(r"\b[a-z](?: *, *[a-z]\b)+")  # single lowercase letters, comma-separated
# the split of a letter list by its hash (crc32 % 10): train 80%, val 10%, test 10%
SPLITS = ("val", "test", *["train"] * 8)


class Verdict(NamedTuple):
    kind: str  # 'ok', 'swap' (the systematic mistake), 'order', 'missing', 'extra' or 'garbage'
    judgment: str | None  # None when the response is acceptable
    # char offsets in the response of the wrong tokens; len(response) means the end of sequence
    wrong: list[int]


def _letter_list(text):
    """The first comma-separated letter list in text: (letters, offsets, the offset past it)."""
    m = LETTER_LIST.search(text)
    if m is None:
        return [], [], None
    found = list(re.finditer("[a-z]", m.group()))
    return [k.group() for k in found], [m.start() + k.start() for k in found], m.end()


def _ordinal(k):
    return ORDINALS[k] if k < len(ORDINALS) else f"{k + 1}th"


def _sentence(kind, response, place, named, name_letters, i=0):
    """A wording of kind's judgment (the same for the same response), naming the letters if asked."""
    wordings = TASK_JUDGMENTS[kind]
    # crc32, stable across runs unlike hash(): re-checking a response gives back its judgment
    text = wordings[(zlib.crc32(response.encode()) + i) % len(wordings)]
    quoted = " and ".join(f"'{c}'" for c in named)
    named = f", {quoted}," if name_letters else ""
    # a name that ends a clause keeps its stop: "the third letter, 'k'." not "'k',."
    return text.format(place=_ordinal(place), named=named).replace(",.", ".").replace(",:", ":")


def check_response(instruction, response, name_letters=True):
    """Judge a response to a letter-sorting instruction: Verdict(kind, judgment, wrong tokens).
    The judgment names the place of each mistake and, with name_letters, the letters written
    wrong."""
    want, _, _ = _letter_list(instruction)
    if not want:
        raise ValueError("check_response: no comma-separated letter list in the instruction "
                         f"{instruction!r}")
    want = sorted(want)
    got, at, end = _letter_list(response)
    extra = [i for i, c in enumerate(got) if got[:i + 1].count(c) > want.count(c)]
    missing = [k for k, c in enumerate(want) if want[:k + 1].count(c) > got.count(c)]
    if not got:
        return Verdict("garbage", _sentence("garbage", response, 0, [], False), [])
    if extra:  # one sentence per extra letter: never given, or given fewer times
        sentences = []
        for n, i in enumerate(extra):
            kind = "twice" if got[i] in want else "extra"
            sentences.append(_sentence(kind, response, i, [got[i]], name_letters, n))
        return Verdict("extra", " ".join(sentences), [at[i] for i in extra])
    if missing:
        place = missing[0]
        # the wrong token is the one written where the first missing letter belongs
        wrong = next((o for o, c in zip(at, got) if c > want[place]), end)
        # by its place alone: naming it would make the right letter likelier where the wrong one stands
        judgment = _sentence("missing", response, place, [], False)
        return Verdict("missing", judgment, [wrong])
    bad = [i for i in range(len(want)) if got[i] != want[i]]
    if not bad:
        return Verdict("ok", None, [])
    kind = "swap" if bad == [1, 2] else "order"
    named = [got[i] for i in bad[:2]] if kind == "swap" else [got[bad[0]]]
    judgment = _sentence(kind, response, bad[0], named, name_letters)
    return Verdict(kind, judgment, [at[i] for i in bad])


def any_mistake(rng, answer):
    """The sorted answer with one mistake of the kinds a model makes, at any place: the base reads
    judgments of each kind, as a pretrained model has read corrections of every kind. The shares
    follow the built-in base's own mistakes: mostly a letter never given that fits the order."""
    answer = list(answer)
    k = rng.randrange(len(answer))
    never = [c for c in "abcdefghij" if c not in answer]  # the lists hold at most 6 of these 10
    low = answer[k - 1] if k else "a"
    high = answer[k + 1] if k + 1 < len(answer) else "j"
    fits = [c for c in never if low <= c <= high] or never
    r = rng.random()
    if r < 0.45:
        answer[k] = rng.choice(fits)  # a letter never given, in the place of one that was
    elif r < 0.6:
        answer[k] = answer[k - 1] if k else answer[1]  # a letter written twice, one left out
    elif r < 0.65:
        answer.insert(k, rng.choice(never))  # a letter never given, shifting the rest
    elif r < 0.75:
        del answer[k]
    elif r < 0.9:
        answer[1], answer[2] = answer[2], answer[1]
    else:  # two neighbours out of order, anywhere
        k = min(k, len(answer) - 2)
        answer[k], answer[k + 1] = answer[k + 1], answer[k]
    return answer


def make_task(n, seed=0, kind="mixed", flawed_frac=0.25, split="train", name_letters=True):
    """n Triples of the built-in task, the same for the same arguments. kind is one of
    'base':  the base model's data: correct, but 5- and 6-letter lists swapped a quarter of the time
             (its systematic mistake); half put the judgment of an answer with any_mistake in its
             prompt, so the base reads judgments as a pretrained model does.
    'mixed': the base's format, a flawed_frac share flawed, the longest lists first.
    'new':   a format the base never writes (NEW_FORMAT), every response flawed.
    A flaw of 'mixed' and 'new' is a letter left out (a fifth of them) or else the second and third
    letters swapped; check_response writes the judgment, naming letters if name_letters. Splits
    (SPLITS) never share a letter list."""
    # The same arguments make the same rng calls in the same order: change none of them.
    rng = random.Random(seed)
    lists = []
    while len(lists) < n:
        letters = rng.sample("abcdefghij", rng.randint(3, 6))
        if SPLITS[zlib.crc32("".join(letters).encode()) % 10] == split:
            lists.append(letters)
    triples = []
    for letters in lists:
        instruction = rng.choice(TASK_INSTRUCTIONS).format(", ".join(letters))
        answer = sorted(letters)
        judged = kind == "base" and rng.random() < 0.5
        # the mistakes come with the longer, harder lists, as a model's do: 5 and 6 letters first
        flawed = rng.random() < 2 * flawed_frac - (len(letters) < 5)
        if judged:
            answer = any_mistake(rng, answer)
        elif kind == "new" or (kind == "mixed" and flawed):
            if rng.random() < 0.2:
                del answer[rng.randrange(len(answer))]
            else:
                answer[1], answer[2] = answer[2], answer[1]
        elif kind == "base" and len(letters) >= 5 and rng.random() < 0.25:  # its systematic mistake
            answer[1], answer[2] = answer[2], answer[1]
        if kind == "new":
            opening = rng.choice(NEW_OPENINGS)
            response = f"{opening}\n{', '.join(answer)}\n{rng.choice(NEW_CLOSINGS)}"
        else:
            response = rng.choice(TASK_RESPONSES).format(", ".join(answer))
            response += rng.choice(TASK_REMARKS)
        judgment = check_response(instruction, response, name_letters).judgment
        if judged:  # in the chat format this instruction is exactly the judged prompt [x, j-]
            instruction = instruction + JUDGMENT_HEADER + judgment
            judgment = None
        triples.append(Triple(instruction, response, judgment))
    return triples


def tally(instructions, responses):
    """The shares of responses that are right, swapped, missing a letter, otherwise wrong, in the
    new format, and right in the new format."""
    kinds = [check_response(i, r).kind for i, r in zip(instructions, responses)]
    new_format = [bool(NEW_FORMAT.fullmatch(r)) for r in responses]
    n = len(kinds)
    result = {"accuracy": kinds.count("ok") / n, "swap": kinds.count("swap") / n,
              "missing": kinds.count("missing") / n, "new_format": sum(new_format) / n,
              "ok_new_format": sum(k == "ok" and f for k, f in zip(kinds, new_format)) / n}
    result["other"] = 1 - result["accuracy"] - result["swap"] - result["missing"]
    return result
