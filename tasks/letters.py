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
# Judgments name a mistake's kind and place, never its letters: those make every token likelier
TASK_JUDGMENTS = {
    "swap": ("The second and third letters are in the wrong order.",
             "Close, but the second and third are swapped.",
             "All in order but the second and third letters: they should trade places.",
             "Almost right; the second and third letters are the wrong way round.",
             "The second and third letters need to be switched.",
             "Nearly sorted, but the second pair is reversed."),
    "order": ("The order is wrong from the {} letter on.",
              "The sorting breaks down at the {} letter.",
              "Not sorted: it goes wrong from the {} letter.",
              "The letters are out of order from the {} on."),
    "missing": ("The {} letter is missing.", "One letter was left out: the {} one.",
                "Incomplete: the letter that belongs in the {} place is missing."),
    "extra": ("It includes letters that do not belong.", "Some of these letters were never given."),
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


def check_response(instruction, response):
    """Judge a response to a letter-sorting instruction: Verdict(kind, judgment, wrong tokens)."""
    want, _, _ = _letter_list(instruction)
    if not want:
        raise ValueError("check_response: no comma-separated letter list in the instruction "
                         f"{instruction!r}")
    want = sorted(want)
    got, at, end = _letter_list(response)
    extra = [at[i] for i, c in enumerate(got) if got[:i + 1].count(c) > want.count(c)]
    missing = [k for k, c in enumerate(want) if want[:k + 1].count(c) > got.count(c)]
    place = 0  # where the order and missing wordings point; the others have no slot for it
    if not got:
        kind = "garbage"
        wrong = []
    elif extra:
        kind = "extra"
        wrong = extra
    elif missing:
        kind = "missing"
        place = missing[0]
        # the wrong token is the one written where the first missing letter belongs
        wrong = [next((o for o, c in zip(at, got) if c > want[place]), end)]
    else:
        bad = [i for i in range(len(want)) if got[i] != want[i]]
        if not bad:
            return Verdict("ok", None, [])
        kind = "swap" if bad == [1, 2] else "order"
        place = bad[0]
        wrong = [at[i] for i in bad]
    wordings = TASK_JUDGMENTS[kind]
    # crc32, stable across runs unlike hash(): re-checking a response gives back its judgment
    text = wordings[zlib.crc32(response.encode()) % len(wordings)]
    ordinal = ORDINALS[place] if place < len(ORDINALS) else f"{place + 1}th"
    return Verdict(kind, text.format(ordinal), wrong)


def make_task(n, seed=0, kind="mixed", flawed_frac=0.25, split="train"):
    """n Triples of the built-in task, the same for the same arguments. kind is one of
    'base':  the base model's data: correct, but 5- and 6-letter lists swapped a quarter of the time
             (its systematic mistake); a quarter put the judgment of a flawed answer in its prompt,
             so the base reads judgments as a pretrained model does.
    'mixed': the base's format, a flawed_frac share flawed, the longest lists first.
    'new':   a format the base never writes (NEW_FORMAT), every response flawed.
    A flaw is a letter left out (a fifth of them) or else the second and third letters swapped;
    check_response writes the judgment. Splits (SPLITS) never share a letter list."""
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
        judged = kind == "base" and rng.random() < 0.25
        # the mistakes come with the longer, harder lists, as a model's do: 5 and 6 letters first
        flawed = rng.random() < 2 * flawed_frac - (len(letters) < 5)
        if judged or kind == "new" or (kind == "mixed" and flawed):
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
        judgment = check_response(instruction, response).judgment
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
