"""IFEval's verifiable instructions as a judgment task: its prompts, a judge and its four scores.

IFEval (Zhou et al. 2023, arXiv 2311.07911) gives 541 prompts, each with one to three instructions a
program can verify ("no commas", "fewer than 100 words", "end with 'Any other questions?'"). This
file re-implements its 25 checkers (google-research/google-research, instruction_following_eval/)
with the standard library only, each answering in words, as a critic would: `check` judges one
instruction, `judge` a whole prompt (the judge of scripts/' online loop on a real model), `score`
gives IFEval's prompt- and instruction-level accuracies, strict and loose. IFEval's prompts are a
TEST set: never train on them. For training, `add_constraints` appends IFEval-style constraints,
drawn at random, to instructions of another source, with the kwargs `judge` reads.

Where IFEval needs NLTK or langdetect this file uses a rule of its own (see count_sentences,
capital_words, detect_language); every other checker follows the reference semantics.
"""
import inspect
import json
import re
import string
from collections import Counter
from functools import partial

RELATIONS = ("less than", "at least")
ENDING_PHRASES = ("Any other questions?", "Is there anything else I can help with?")
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")
SECTION_SPLITTERS = ("Section", "SECTION")
# a few of IFEval's generate_keywords words: concrete, easy to work into any answer
KEYWORDS = ("garden", "morning", "river", "bicycle", "history", "music", "window", "coffee",
            "friend", "mountain", "letter", "kitchen", "weather", "market", "journey", "lesson",
            "energy", "library", "camera", "balance", "promise", "season", "village", "planet")
LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "fi": "Finnish", "sw": "Swahili", "vi": "Vietnamese",
    "tr": "Turkish", "pl": "Polish", "ru": "Russian", "uk": "Ukrainian", "bg": "Bulgarian",
    "hi": "Hindi", "mr": "Marathi", "ne": "Nepali", "ar": "Arabic", "fa": "Persian", "ur": "Urdu",
    "ko": "Korean", "ja": "Japanese", "zh": "Chinese", "th": "Thai", "bn": "Bengali",
    "ta": "Tamil", "te": "Telugu", "gu": "Gujarati", "kn": "Kannada", "ml": "Malayalam",
    "pa": "Punjabi", "el": "Greek", "he": "Hebrew", "ka": "Georgian", "hy": "Armenian"}


# ---------------------------------------------------------------- text helpers

def _quote(text, at=0, width=40):
    """A piece of text (at most ~width chars, on one line) around offset `at`, quoted."""
    start = max(0, at - width // 3)
    piece = " ".join(text[start:start + width].split())
    before = "..." if start > 0 else ""
    after = "..." if start + width < len(text) else ""
    return f"'{before}{piece}{after}'"


def _tail(text, width=40):
    """The last ~width chars of text, quoted: where an ending went wrong."""
    piece = " ".join(text.strip()[-width:].split())
    return "'" + ("..." if len(text.strip()) > width else "") + piece + "'"


def _fewer_or_at_least(relation, n, noun):
    """IFEval's relation in words: 'less than' is strict, 'at least' inclusive."""
    return f"fewer than {n} {noun}" if relation == "less than" else f"at least {n} {noun}"


def _holds(relation, count, n):
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, not {relation!r}")
    return count < n if relation == "less than" else count >= n


def count_words(text):
    """IFEval's count: nltk RegexpTokenizer(r"\\w+") is exactly this findall."""
    return len(re.findall(r"\w+", text))


_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e",
                  "inc", "ltd", "co", "fig", "no", "approx", "u.s", "a.m", "p.m"}


def count_sentences(text):
    """Sentences end at . ! or ? (then closing quotes) before a space or the end of the text.

    Differs from IFEval's NLTK punkt: a fixed abbreviation list, initials and line-leading numbers
    ("1.") never end a sentence, and punkt's learned statistics are not used."""
    boundaries, last_end = 0, 0
    for m in re.finditer(r"[.!?]+[\"'”’)\]]*(?=\s|$)", text):
        words_before = text[last_end:m.start()].split()
        word = words_before[-1].lower() if words_before else ""
        line_start = text.rfind("\n", 0, m.start()) + 1
        is_list_number = word.isdigit() and not text[line_start:m.start() - len(word)].strip()
        if m.group().startswith(".") and m.group().count(".") == 1 and (
                word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or is_list_number):
            continue
        if words_before:
            boundaries += 1
        last_end = m.end()
    return boundaries + bool(text[last_end:].strip())


def capital_words(text):
    """Words all in capitals. Differs from IFEval's nltk word_tokenize only in splitting
    contractions at the apostrophe (DON'T -> DON, T, where NLTK gives DO, N'T: the same count)."""
    return [w for w in re.findall(r"\w+(?:-\w+)*", text) if w.isupper()]


# ---------------------------------------------------------------- language heuristic

_SCRIPTS = (  # (first, last code point, script); Latin is every other letter below U+0250
    (0x0370, 0x03FF, "el"), (0x0400, 0x04FF, "cyrillic"), (0x0530, 0x058F, "hy"),
    (0x0590, 0x05FF, "he"), (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"),
    (0x0900, 0x097F, "devanagari"), (0x0980, 0x09FF, "bn"), (0x0A00, 0x0A7F, "pa"),
    (0x0A80, 0x0AFF, "gu"), (0x0B80, 0x0BFF, "ta"), (0x0C00, 0x0C7F, "te"),
    (0x0C80, 0x0CFF, "kn"), (0x0D00, 0x0D7F, "ml"), (0x0E00, 0x0E7F, "th"),
    (0x10A0, 0x10FF, "ka"), (0x1100, 0x11FF, "ko"), (0x1E00, 0x1EFF, "latin"),
    (0x3040, 0x30FF, "kana"), (0x3130, 0x318F, "ko"), (0x3400, 0x4DBF, "han"),
    (0x4E00, 0x9FFF, "han"), (0xAC00, 0xD7AF, "ko"), (0xFB50, 0xFEFF, "arabic"))

_STOP_WORDS = {  # frequent function words, chosen to overlap little between languages
    "en": "the and is are of to that it with for this you was be not have they what which",
    "de": "der die das und ist nicht ein eine ich zu mit sich auf für den dem von wir auch",
    "fr": "le les et est des une du que pas pour dans qui sur avec ce je nous vous au",
    "es": "el los las y es que en una por para con del lo su como muy pero está",
    "it": "il di che è per non con sono della gli nel anche questo ma più sua alla",
    "pt": "os é não com para do da em uma são você mas mais como seu pelo isso",
    "nl": "het een en van dat niet op te zijn voor met ik je ook maar wordt",
    "fi": "ja on ei se että oli hän mutta kuin myös ovat tämä joka mitä kun tai jos",
    "sw": "na ya wa kwa ni za katika hii kama lakini sana kuwa cha hiyo watu pia",
    "vi": "và của là không có những được các một trong cho người này đã với để khi rất",
    "tr": "ve bir bu için ile çok ama gibi daha olarak değil ben sen var yok",
    "pl": "się nie jest że jak co ale tak dla po przez oraz jego są",
    "ru": "и в не что на я это как он по но был его она они также который",
    "bg": "е са това като със във ще които който тя те също но от",
    "hi": "है हैं और के की का में से को यह नहीं था",
    "mr": "आहे आहेत आणि च्या हे ही या ते नाही होते मध्ये त्या",
    "ne": "छ छन् र मा हो पनि यो गर्न भएको थियो हुन्छ",
}
_STOP_WORDS = {lang: set(words.split()) for lang, words in _STOP_WORDS.items()}
_LATIN = ("en", "de", "fr", "es", "it", "pt", "nl", "fi", "sw", "vi", "tr", "pl")
# languages written in Latin letters, with or without stop words here
LATIN_SCRIPT_LANGUAGES = set(_LATIN) | set("ro id ms cs sk sl hr hu sv da no et lv lt af ca tl so "
                                          "cy sq eu gl is ga mt yo ha zu xh".split())
_PUNCTUATION = string.punctuation + "।॥،؟«»“”‘’–—…¿¡"


def _script(char):
    code = ord(char)
    for first, last, script in _SCRIPTS:
        if first <= code <= last:
            return script
    return "latin" if code < 0x250 else None


def _script_counts(text):
    scripts = Counter(_script(c) for c in text if c.isalpha())
    scripts.pop(None, None)
    return scripts


def _main_script(text):
    scripts = _script_counts(text)
    return scripts.most_common(1)[0][0] if scripts else None


def _best_by_stop_words(words, languages):
    """The language with the most stop-word hits; None when no word is a stop word."""
    hits = {lang: sum(w in _STOP_WORDS[lang] for w in words) for lang in languages}
    best = max(languages, key=lambda lang: hits[lang])
    return best if hits[best] else None


def detect_language(text):
    """An ISO 639-1 code for text, or None when it cannot tell (IFEval then counts a pass).

    Differs from IFEval's langdetect (character n-gram statistics): the letters' main Unicode
    script decides, then stop words (Latin, Devanagari, Cyrillic) or letters only one language
    of the script uses (Arabic script, Cyrillic) pick the language."""
    scripts = _script_counts(text)
    if not scripts:
        return None
    script = scripts.most_common(1)[0][0]
    words = [w.strip(_PUNCTUATION) for w in text.lower().split()]
    if script in ("han", "kana"):  # Japanese mixes kana into its kanji; Chinese has none
        return "ja" if scripts["kana"] > 0.1 * (scripts["kana"] + scripts["han"]) else "zh"
    if script == "latin":
        return _best_by_stop_words(words, _LATIN)
    if script == "devanagari":
        return _best_by_stop_words(words, ("hi", "mr", "ne")) or "hi"
    if script == "cyrillic":
        return _cyrillic_language(text.lower(), words)
    if script == "arabic":
        if sum(text.count(c) for c in "ےںٹڈڑھ") > 0:  # letters of Urdu alone
            return "ur"
        return "fa" if sum(text.count(c) for c in "پچژگکی") > 0 else "ar"
    return script


def _cyrillic_language(lowered, words):
    if any(c in lowered for c in "іїєґ"):
        return "uk"
    ru = sum(lowered.count(c) for c in "ыэё") + sum(w in _STOP_WORDS["ru"] for w in words)
    bg = lowered.count("ъ") + sum(w in _STOP_WORDS["bg"] for w in words)
    return "bg" if bg > ru else "ru"


def _language_name(code):
    return LANGUAGE_NAMES.get(code, code)


# ---------------------------------------------------------------- the 25 checkers
# each takes (response, **kwargs) and returns None when the instruction holds, else a judgment


def _no_comma(response):
    commas = response.count(",")
    if commas:
        return (f"The instruction asked for no commas; the response has {commas}, "
                f"the first in {_quote(response, response.index(','))}.")


def _one_case(response, upper):
    """All lowercase (upper=False) or all capitals, in English: the first letter of the other case
    is where it breaks."""
    what = "in English capital letters" if upper else "in lowercase English"
    asked = f"The instruction asked for the whole response {what}; "
    follows = response.isupper() if upper else response.islower()
    if follows:
        return _not_english(what, response)
    wrong = str.islower if upper else str.isupper
    at = next((i for i, c in enumerate(response) if wrong(c)), None)
    if at is None:
        return asked + f"it has no {'capital' if upper else 'lowercase'} letters."
    other = "lowercase" if upper else "capital"
    return asked + f"it has {other} letters, e.g. in {_quote(response, at)}."


def _not_english(what, response):
    language = detect_language(response)
    if language not in (None, "en"):
        return (f"The instruction asked for the whole response {what}; "
                f"it reads as {_language_name(language)}, not English.")


def _capital_word_frequency(response, capital_frequency, capital_relation):
    words = capital_words(response)
    if not _holds(capital_relation, len(words), capital_frequency):
        wanted = _fewer_or_at_least(capital_relation, capital_frequency, "words in all capitals")
        return f"The instruction asked for {wanted}; the response has {len(words)}."


def _response_language(response, language):
    found = detect_language(response)
    in_latin = _main_script(response) == "latin"
    if found is None and in_latin and language not in LATIN_SCRIPT_LANGUAGES:
        return (f"The instruction asked for the whole response in {_language_name(language)}; "
                "it is written in Latin letters.")
    if found not in (None, language):
        return (f"The instruction asked for the whole response in {_language_name(language)}; "
                f"it reads as {_language_name(found)}.")


def _number_words(response, num_words, relation):
    count = count_words(response)
    if not _holds(relation, count, num_words):
        wanted = _fewer_or_at_least(relation, num_words, "words")
        return f"The instruction asked for {wanted}; the response has {count}."


def _number_sentences(response, num_sentences, relation):
    count = count_sentences(response)
    if not _holds(relation, count, num_sentences):
        wanted = _fewer_or_at_least(relation, num_sentences, "sentences")
        return f"The instruction asked for {wanted}; the response has {count}."


def _number_paragraphs(response, num_paragraphs):
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    asked = (f"The instruction asked for {num_paragraphs} paragraphs separated by the markdown "
             "divider ***")
    inner = [i for i, p in enumerate(paragraphs[1:-1], 1) if not p.strip()]
    if inner:  # an empty paragraph between two dividers fails, at the ends it is ignored
        where = len("***".join(paragraphs[:inner[0]]))
        return f"{asked}; the response has an empty paragraph near {_quote(response, where)}."
    count = len(paragraphs) - (not paragraphs[0].strip()) - (not paragraphs[-1].strip())
    if count != num_paragraphs:
        return f"{asked}; the response has {count}."


def _paragraph_first_word(paragraph):
    """IFEval's first word: quotes stripped on the left, cut at the first . , ? ! ' or \"."""
    word = paragraph.split()[0].lstrip("'").lstrip('"')
    return re.split(r"[.,?!'\"]", word)[0].lower()


def _nth_paragraph_first_word(response, num_paragraphs, nth_paragraph, first_word):
    paragraphs = response.split("\n\n")
    count = sum(bool(p.strip()) for p in paragraphs)
    asked = (f"The instruction asked for {num_paragraphs} paragraphs separated by blank lines, "
             f"paragraph {nth_paragraph} starting with '{first_word}'")
    # IFEval indexes the raw split, empty pieces included
    if nth_paragraph > count or not paragraphs[nth_paragraph - 1].strip():
        return f"{asked}; the response has no paragraph {nth_paragraph} (it has {count})."
    found = _paragraph_first_word(paragraphs[nth_paragraph - 1].strip())
    if found != first_word.lower():
        return f"{asked}; paragraph {nth_paragraph} starts with '{found}'."
    if count != num_paragraphs:
        return f"{asked}; the response has {count} paragraphs."


def _number_placeholders(response, num_placeholders):
    count = len(re.findall(r"\[.*?\]", response))
    if count < num_placeholders:
        return (f"The instruction asked for at least {num_placeholders} placeholders in square "
                f"brackets such as [address]; the response has {count}.")


_POSTSCRIPT_PATTERNS = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}


def _postscript(response, postscript_marker):
    marker = postscript_marker.strip()
    pattern = _POSTSCRIPT_PATTERNS.get(marker, r"\s*" + re.escape(marker.lower()) + r".*$")
    if not re.search(pattern, response.lower(), flags=re.MULTILINE):
        return (f"The instruction asked for a postscript starting with {marker}; "
                "the response has none.")


def _number_bullet_lists(response, num_bullets):
    bullets = (re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
               + re.findall(r"^\s*-.*$", response, flags=re.MULTILINE))
    if len(bullets) != num_bullets:
        return (f"The instruction asked for exactly {num_bullets} markdown bullet points "
                f"('* ' or '- '); the response has {len(bullets)}.")


def count_highlights(response):
    """IFEval's count: non-empty *spans* on one line, plus non-empty **spans** counted again."""
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip()]
    return len(single) + len(double)


def _number_highlighted_sections(response, num_highlights):
    count = count_highlights(response)
    if count < num_highlights:
        return (f"The instruction asked for at least {num_highlights} sections highlighted in "
                f"markdown, i.e. *highlighted section*; the response has {count}.")


def _multiple_sections(response, section_spliter, num_sections):
    splitter = section_spliter.strip()
    count = len(re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", response)) - 1
    if count < num_sections:
        return (f"The instruction asked for {num_sections} sections, each starting with "
                f"'{splitter} X' (X a number); the response has {count}.")


def _strip_code_fence(response):
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):  # in turn, as IFEval chains them
        text = text.removeprefix(fence)
    return text.removesuffix("```").strip()


def _json_format(response):
    text = _strip_code_fence(response)
    try:
        json.loads(text)
    except ValueError as error:
        at = getattr(error, "pos", 0)
        return ("The instruction asked for the entire output to be JSON; it does not parse "
                f"({getattr(error, 'msg', error)} at {_quote(text, at)}).")


def _title(response):
    titles = [t for t in re.findall(r"<<[^\n]+>>", response) if t.lstrip("<").rstrip(">").strip()]
    if not titles:
        return ("The instruction asked for a title in double angular brackets, such as "
                "<<poem of joy>>; the response has none.")


def _two_responses(response):
    parts = response.split("******")
    asked = "The instruction asked for two different responses separated by ******"
    if any(not p.strip() for p in parts[1:-1]):
        return f"{asked}; the response has an empty one between two separators."
    answers = [p.strip() for p in parts if p.strip()]
    if len(answers) != 2:
        return f"{asked}; the response has {len(answers)}."
    if answers[0] == answers[1]:
        return f"{asked}; the two responses are the same."


def _repeat_prompt(response, prompt_to_repeat):
    wanted, got = prompt_to_repeat.strip().lower(), response.strip().lower()
    if not got.startswith(wanted):
        differ = next((i for i, (a, b) in enumerate(zip(wanted, got)) if a != b), len(got))
        return ("The instruction asked to first repeat the request word for word; the response "
                f"departs from it at {_quote(response.strip(), differ)}.")


def _end_checker(response, end_phrase):
    ending = response.strip().strip('"')
    if not ending.lower().endswith(end_phrase.strip().lower()):
        return ("The instruction asked for the response to end with the exact phrase "
                f"'{end_phrase.strip()}'; it ends with {_tail(ending)}.")


def _quotation(response):
    text = response.strip()
    if not (len(text) > 1 and text[0] == '"' and text[-1] == '"'):
        return ("The instruction asked for the whole response wrapped in double quotation marks; "
                f"it starts with {_quote(text, 0, 15)} and ends with {_tail(text, 15)}.")


def _constrained_response(response):
    if not any(option in response.strip() for option in CONSTRAINED_OPTIONS):
        options = ", ".join(f"'{o}'" for o in CONSTRAINED_OPTIONS)
        return f"The instruction asked to answer with one of {options}; the response uses none."


def _existence(response, keywords):
    # IFEval searches the keyword as a regex, case-insensitive, inside words too; escaped here
    missing = [k for k in keywords if not re.search(re.escape(k), response, flags=re.IGNORECASE)]
    if missing:
        return (f"The instruction asked to include the keywords "
                f"{', '.join(repr(k) for k in keywords)}; the response lacks "
                f"{', '.join(repr(k) for k in missing)}.")


def _frequency(response, keyword, frequency, relation):
    count = len(re.findall(re.escape(keyword.strip()), response, flags=re.IGNORECASE))
    if not _holds(relation, count, frequency):
        wanted = _fewer_or_at_least(relation, frequency, "times")
        return (f"The instruction asked for the word '{keyword.strip()}' {wanted}; "
                f"the response has it {count} times.")


def _forbidden_words(response, forbidden_words):
    for word in sorted(set(forbidden_words)):
        found = re.search(r"\b" + re.escape(word) + r"\b", response, flags=re.IGNORECASE)
        if found:
            return (f"The instruction forbade the words {', '.join(map(repr, forbidden_words))}; "
                    f"the response uses '{word}' in {_quote(response, found.start())}.")


def _letter_frequency(response, letter, let_frequency, let_relation):
    letter = letter.strip().lower()
    count = response.lower().count(letter)
    if not _holds(let_relation, count, let_frequency):
        wanted = _fewer_or_at_least(let_relation, let_frequency, "times")
        return (f"The instruction asked for the letter '{letter}' {wanted}; "
                f"the response has it {count} times.")


CHECKERS = {
    "keywords:existence": _existence,
    "keywords:frequency": _frequency,
    "keywords:forbidden_words": _forbidden_words,
    "keywords:letter_frequency": _letter_frequency,
    "language:response_language": _response_language,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:number_words": _number_words,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": _number_placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _number_bullet_lists,
    "detectable_format:constrained_response": _constrained_response,
    "detectable_format:number_highlighted_sections": _number_highlighted_sections,
    "detectable_format:multiple_sections": _multiple_sections,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat_prompt,
    "startend:end_checker": _end_checker,
    "change_case:capital_word_frequency": _capital_word_frequency,
    "change_case:english_capital": partial(_one_case, upper=True),
    "change_case:english_lowercase": partial(_one_case, upper=False),
    "punctuation:no_comma": _no_comma,
    "startend:quotation": _quotation,
}
SUPPORTED = tuple(CHECKERS)


# ---------------------------------------------------------------- the judge and the scores

def check(instruction_id, kwargs, prompt, response):
    """None when `response` follows the instruction, else a judgment saying what is broken.

    `prompt` is unused by the 25 checkers (IFEval passes it only to instructions with a 'prompt'
    argument; none is registered); it is kept so that every judge reads the same fields."""
    if instruction_id not in CHECKERS:
        raise ValueError(f"unknown IFEval instruction id {instruction_id!r}")
    if not response.strip():  # IFEval fails every instruction on an empty response
        return "The response is empty."
    given = {key: value for key, value in (kwargs or {}).items() if value is not None}
    return CHECKERS[instruction_id](response, **given)


def judge(prompt, instruction_ids, kwargs, response):
    """The judgments of every broken instruction, joined by a space; None when all hold."""
    if not response.strip():
        return "The response is empty."
    pairs = zip(instruction_ids, kwargs, strict=True)
    judgments = [check(i, k, prompt, response) for i, k in pairs]
    return " ".join(j for j in judgments if j) or None


def loose_variants(response):
    """IFEval's 8 loose variants: without the first and/or last line, each also without '*'."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
           "\n".join(lines[1:-1]).strip()]
    return cut + [text.replace("*", "") for text in cut]


def _followed(record, response, loose):
    variants = [v for v in loose_variants(response) if v.strip()] if loose else [response]
    return [any(check(i, k, record["prompt"], v) is None for v in variants)
            for i, k in zip(record["instruction_id_list"], record["kwargs"])]


def score(records, responses):
    """IFEval's accuracies: prompt- and instruction-level, strict and loose, in [0, 1]; per_type
    holds each instruction id's strict accuracy."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    result = {"n_prompts": len(records)}
    per_type = {}
    for mode in ("strict", "loose"):
        followed = [_followed(r, text, mode == "loose") for r, text in zip(records, responses)]
        instances = [f for prompt in followed for f in prompt]
        result[f"prompt_{mode}"] = sum(map(all, followed)) / max(len(followed), 1)
        result[f"instruction_{mode}"] = sum(instances) / max(len(instances), 1)
        if mode == "strict":
            for record, prompt in zip(records, followed):
                for instruction_id, ok in zip(record["instruction_id_list"], prompt):
                    per_type.setdefault(instruction_id, []).append(ok)
    result["per_type"] = {i: sum(oks) / len(oks) for i, oks in sorted(per_type.items())}
    return result


def read_prompts(path):
    """The records of an IFEval-format JSONL file; a malformed one, or none, raises a one-line
    ValueError."""
    records = []
    with open(path, encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                records.append(_parse_record(line, f"{path}:{number}"))
    if not records:
        raise ValueError(f"{path}: no records (IFEval's input_data.jsonl holds 541)")
    return records


def _parse_record(line, where):
    try:
        record = json.loads(line)
    except ValueError as error:
        raise ValueError(f"{where}: not JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object")
    for field, kind in (("prompt", str), ("instruction_id_list", list), ("kwargs", list)):
        if field not in record:
            raise ValueError(f"{where}: missing field '{field}'")
        if not isinstance(record[field], kind):
            raise ValueError(f"{where}: field '{field}' must be a {kind.__name__}")
    if len(record["kwargs"]) != len(record["instruction_id_list"]):
        raise ValueError(f"{where}: field 'kwargs' has {len(record['kwargs'])} entries, "
                         f"'instruction_id_list' {len(record['instruction_id_list'])}")
    unknown = [i for i in record["instruction_id_list"] if i not in CHECKERS]
    if unknown:
        raise ValueError(f"{where}: field 'instruction_id_list' has unknown id {unknown[0]!r}")
    if not all(isinstance(k, dict) for k in record["kwargs"]):
        raise ValueError(f"{where}: field 'kwargs' must hold JSON objects")
    for instruction_id, kwargs in zip(record["instruction_id_list"], record["kwargs"]):
        _check_kwargs(instruction_id, kwargs, f"{where}: field 'kwargs', {instruction_id}")
    return record


INTEGER_KWARGS = {"num_words", "num_sentences", "num_paragraphs", "nth_paragraph",
                  "num_placeholders", "num_bullets", "num_highlights", "num_sections", "frequency",
                  "let_frequency", "capital_frequency"}


def _check_kwargs(instruction_id, kwargs, where):
    """kwargs holds exactly the checker's arguments (a null is no argument, as in check), each of
    its type: counts integers, relations one of RELATIONS, keyword lists lists of strings."""
    parameters = inspect.signature(CHECKERS[instruction_id]).parameters
    wanted = [name for name, p in parameters.items() if name != "response" and p.default is p.empty]
    given = {key: value for key, value in kwargs.items() if value is not None}
    unknown = sorted(set(given) - set(wanted))
    missing = sorted(set(wanted) - set(given))
    if unknown or missing:
        got = f"unknown key {unknown[0]!r}" if unknown else f"no key {missing[0]!r}"
        raise ValueError(f"{where}: {got}; expected the keys {', '.join(wanted) or 'none'}")
    for key, value in given.items():
        if "relation" in key:
            ok, kind = value in RELATIONS, f"one of {', '.join(map(repr, RELATIONS))}"
        elif key in INTEGER_KWARGS:
            ok, kind = type(value) is int, "an integer"
        elif key in ("keywords", "forbidden_words"):
            ok = isinstance(value, list) and all(isinstance(w, str) for w in value)
            kind = "a list of strings"
        else:
            ok, kind = isinstance(value, str), "a string"
        if not ok:
            raise ValueError(f"{where}: key {key!r} must be {kind}, got {value!r}")


# ---------------------------------------------------------------- constraints for training

def _conflict_table():
    """IFEval's instructions_registry.INSTRUCTION_CONFLICTS, made symmetric, plus one of ours:
    an all-lowercase or all-capital response cannot hold 'Section 1' (the splitter is cased)."""
    everything = set(CHECKERS)
    conflicts = {
        "language:response_language": {
            "detectable_format:multiple_sections", "keywords:existence", "keywords:frequency",
            "keywords:forbidden_words", "startend:end_checker", "change_case:english_capital",
            "change_case:english_lowercase"},
        "length_constraints:number_paragraphs": {
            "length_constraints:nth_paragraph_first_word", "length_constraints:number_sentences"},
        "detectable_format:constrained_response": everything,
        "detectable_format:multiple_sections": {
            "detectable_format:number_highlighted_sections", "change_case:english_lowercase",
            "change_case:english_capital"},
        "detectable_format:json_format": everything - {
            "keywords:forbidden_words", "keywords:existence"},
        "combination:two_responses": everything - {
            "keywords:forbidden_words", "keywords:existence", "language:response_language",
            "detectable_format:title", "punctuation:no_comma"},
        "combination:repeat_prompt": everything - {
            "keywords:existence", "detectable_format:title", "punctuation:no_comma"},
        "change_case:capital_word_frequency": {
            "change_case:english_lowercase", "change_case:english_capital"},
        "change_case:english_lowercase": {"change_case:english_capital"},
        "startend:quotation": {"detectable_format:title"},
    }
    table = {i: {i} for i in CHECKERS}
    for a, others in conflicts.items():
        for b in others:
            table[a].add(b)
            table[b].add(a)
    return table


CONFLICTS = _conflict_table()

# Phrasings modelled on IFEval's description templates, several per type.
PHRASINGS = {
    "punctuation:no_comma": (
        "In your entire response, refrain from the use of any commas.",
        "Do not use any commas in your response.",
        "Your answer must not contain a single comma."),
    "change_case:english_lowercase": (
        "Your entire response should be in English, and in all lowercase letters. "
        "No capital letters are allowed.",
        "Answer in English using only lowercase letters; no capital letters at all.",
        "Write your whole answer in English and in lowercase, without any capital letter."),
    "change_case:english_capital": (
        "Your entire response should be in English, and in all capital letters.",
        "Write your whole answer in English, using only CAPITAL letters.",
        "Respond in English with every letter capitalized."),
    "change_case:capital_word_frequency": (
        "In your response, words with all capital letters should appear {capital_relation} "
        "{capital_frequency} times.",
        "Use {capital_relation} {capital_frequency} words written entirely in capital letters.",
        "The number of words in all caps in your answer should be {capital_relation} "
        "{capital_frequency}."),
    "length_constraints:number_words": (
        "Answer with {relation} {num_words} words.",
        "Your response should contain {relation} {num_words} words.",
        "Keep the length of your answer to {relation} {num_words} words."),
    "length_constraints:number_sentences": (
        "Your response should contain {relation} {num_sentences} sentences.",
        "Answer in {relation} {num_sentences} sentences.",
        "Write {relation} {num_sentences} sentences in your response."),
    "length_constraints:number_paragraphs": (
        "There should be {num_paragraphs} paragraphs. Paragraphs are separated with the markdown "
        "divider: ***",
        "Your response must have exactly {num_paragraphs} paragraphs, separated from each other "
        "by the markdown divider ***.",
        "Write {num_paragraphs} paragraphs and put the markdown divider *** between them."),
    "length_constraints:nth_paragraph_first_word": (
        "There should be {num_paragraphs} paragraphs. Paragraphs and only paragraphs are "
        "separated with each other by two new lines. Paragraph {nth_paragraph} must start with "
        "the word {first_word}.",
        "Write {num_paragraphs} paragraphs separated by blank lines, and begin paragraph "
        "{nth_paragraph} with the word \"{first_word}\"."),
    "detectable_content:number_placeholders": (
        "The response must contain at least {num_placeholders} placeholders represented by "
        "square brackets, such as [address].",
        "Include at least {num_placeholders} placeholders in square brackets, like [name].",
        "Use at least {num_placeholders} placeholders written in square brackets, e.g. [date]."),
    "detectable_content:postscript": (
        "At the end of your response, please explicitly add a postscript starting with "
        "{postscript_marker}",
        "End your answer with a postscript that starts with {postscript_marker}",
        "Add a postscript beginning with {postscript_marker} at the end of your response."),
    "detectable_format:number_bullet_lists": (
        "Your answer must contain exactly {num_bullets} bullet points. Use the markdown bullet "
        "points such as: * This is a point.",
        "Format your answer as exactly {num_bullets} markdown bullet points, each starting "
        "with '* '.",
        "Give exactly {num_bullets} bullet points in markdown, like: * point one"),
    "detectable_format:number_highlighted_sections": (
        "Highlight at least {num_highlights} sections in your answer with markdown, i.e. "
        "*highlighted section*.",
        "Mark at least {num_highlights} parts of your answer as highlighted with markdown, "
        "for example *highlighted part*.",
        "Use markdown to highlight at least {num_highlights} sections, such as *this one*."),
    "detectable_format:multiple_sections": (
        "Your response must have {num_sections} sections. Mark the beginning of each section "
        "with {section_spliter} X, such as {section_spliter} 1.",
        "Divide your answer into {num_sections} sections, starting each with "
        "\"{section_spliter} X\" where X is its number.",
        "Organize the response in {num_sections} parts, each beginning with {section_spliter} "
        "followed by its number (e.g. {section_spliter} 1)."),
    "detectable_format:json_format": (
        "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
        "Your whole answer must be valid JSON; you may wrap it in ``` markdown ticks.",
        "Format the entire response as JSON."),
    "detectable_format:title": (
        "Your answer must contain a title, wrapped in double angular brackets, such as "
        "<<poem of joy>>.",
        "Give your answer a title wrapped in double angular brackets, like <<my title>>.",
        "Include a title in double angular brackets, e.g. <<a title>>."),
    "keywords:existence": (
        "Include keywords {keywords} in the response.",
        "Make sure your answer uses the words {keywords}.",
        "Your response must mention {keywords}."),
    "keywords:frequency": (
        "In your response, the word {keyword} should appear {relation} {frequency} times.",
        "Use the word \"{keyword}\" {relation} {frequency} times in your answer.",
        "The word {keyword} should occur {relation} {frequency} times in your response."),
    "keywords:forbidden_words": (
        "Do not include keywords {forbidden_words} in the response.",
        "Avoid the words {forbidden_words} in your answer.",
        "Your response must not use the words {forbidden_words}."),
    "keywords:letter_frequency": (
        "In your response, the letter {letter} should appear {let_relation} {let_frequency} "
        "times.",
        "Make sure the letter {letter} appears {let_relation} {let_frequency} times in your "
        "answer.",
        "Use the letter \"{letter}\" {let_relation} {let_frequency} times."),
    "startend:end_checker": (
        "Finish your response with this exact phrase: \"{end_phrase}\" No other words should "
        "follow this phrase.",
        "End your answer with the exact phrase \"{end_phrase}\", with nothing after it.",
        "Your response must end with the words: {end_phrase}"),
    "startend:quotation": (
        "Wrap your entire response with double quotation marks.",
        "Put your whole answer inside double quotation marks.",
        "Enclose the entire response in double quotes."),
    "combination:two_responses": (
        "Give two different responses. Responses and only responses should be separated by 6 "
        "asterisk symbols: ******.",
        "Write two different answers, separated by six asterisks: ******",
        "Provide two distinct responses with ****** between them and nowhere else."),
    "combination:repeat_prompt": (
        "First repeat the request word for word without change, then give your answer (1. do "
        "not say any words or characters before repeating the request; 2. the request you need "
        "to repeat does not include this sentence)",
        "Before answering, repeat the request above word for word, without saying anything "
        "before it; this sentence is not part of the request to repeat."),
}
# Left out of training: constrained_response (fits only yes/no questions) and
# response_language (detect_language is too weak to judge a model's attempts at other languages).
TRAINING_TYPES = tuple(PHRASINGS)

_COMMON_WORDS = {"about", "after", "again", "their", "there", "these", "those", "which", "would",
                 "could", "should", "write", "where", "while", "other", "explain", "describe"}


# words other constraints' phrasings put in the answer: never forbidden or counted
_RESERVED_WORDS = {w.lower().strip("?") for p in ENDING_PHRASES for w in p.split()} | {"section"}


def _instruction_words(instruction):
    """Content words of the instruction itself: keywords the answer plausibly uses."""
    words = {w.lower() for w in re.findall(r"[A-Za-z]{5,}", instruction)}
    return sorted(words - _COMMON_WORDS)


def _pick_words(rng, instruction, used, k):
    """k distinct words, from the instruction or the keyword list, not used by another draw."""
    pool = [w for w in _instruction_words(instruction) if w not in used]
    if rng.random() < 0.5 or len(pool) < k:
        pool = [w for w in KEYWORDS if w not in used]
    words = rng.sample(pool, k)
    used.update(words)
    return words


def _draw_kwargs(instruction_id, rng, instruction, used):
    """Parameters for one instruction, from IFEval's ranges."""
    relation = rng.choice(RELATIONS)
    draws = {
        "change_case:capital_word_frequency": lambda: {
            "capital_frequency": rng.randint(1, 20), "capital_relation": relation},
        "length_constraints:number_words": lambda: {
            "num_words": rng.randint(100, 500), "relation": relation},
        # 'less than 1 sentence' cannot be met by any non-empty answer
        "length_constraints:number_sentences": lambda: {
            "num_sentences": rng.randint(2 if relation == "less than" else 1, 20),
            "relation": relation},
        "length_constraints:number_paragraphs": lambda: {"num_paragraphs": rng.randint(1, 5)},
        "length_constraints:nth_paragraph_first_word": lambda: _nth_paragraph_kwargs(
            rng, instruction, used),
        "detectable_content:number_placeholders": lambda: {"num_placeholders": rng.randint(1, 4)},
        "detectable_content:postscript": lambda: {
            "postscript_marker": rng.choice(POSTSCRIPT_MARKERS)},
        "detectable_format:number_bullet_lists": lambda: {"num_bullets": rng.randint(1, 5)},
        "detectable_format:number_highlighted_sections": lambda: {
            "num_highlights": rng.randint(1, 4)},
        "detectable_format:multiple_sections": lambda: {
            "section_spliter": rng.choice(SECTION_SPLITTERS), "num_sections": rng.randint(1, 5)},
        "keywords:existence": lambda: {
            "keywords": sorted(_pick_words(rng, instruction, used, rng.randint(1, 2)))},
        "keywords:frequency": lambda: {
            "keyword": _pick_words(rng, instruction, used, 1)[0],
            "frequency": rng.randint(1, 3), "relation": relation},
        "keywords:forbidden_words": lambda: {
            "forbidden_words": sorted(_pick_words(rng, instruction, used, rng.randint(1, 2)))},
        "keywords:letter_frequency": lambda: {
            "letter": rng.choice(string.ascii_lowercase), "let_frequency": rng.randint(1, 10),
            "let_relation": relation},
        "startend:end_checker": lambda: {"end_phrase": rng.choice(ENDING_PHRASES)},
    }
    return draws[instruction_id]() if instruction_id in draws else {}


def _nth_paragraph_kwargs(rng, instruction, used):
    num_paragraphs = rng.randint(1, 5)
    return {"num_paragraphs": num_paragraphs, "nth_paragraph": rng.randint(1, num_paragraphs),
            "first_word": _pick_words(rng, instruction, used, 1)[0]}


def _phrase(instruction_id, kwargs, rng):
    shown = {k: (", ".join(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
    return rng.choice(PHRASINGS[instruction_id]).format(**shown)


def add_constraints(instruction, rng, n):
    """An IFEval-style training record: `instruction` followed by n (1 to 3) random, mutually
    compatible constraints, with the kwargs that `judge` reads."""
    if not 1 <= n <= 3:
        raise ValueError(f"n must be 1, 2 or 3, not {n}")
    ids = []
    for _ in range(n):  # never empty: each type leaves at least two others for n <= 3
        ids.append(rng.choice([i for i in TRAINING_TYPES
                               if not any(i in CONFLICTS[j] for j in ids)]))
    ids.sort(key=lambda i: i == "combination:repeat_prompt")  # its sentence must come last
    used, kwargs, phrases = set(_RESERVED_WORDS), [], []
    for instruction_id in ids:
        if instruction_id == "combination:repeat_prompt":
            drawn = {"prompt_to_repeat": " ".join([instruction.strip(), *phrases])}
        else:
            drawn = _draw_kwargs(instruction_id, rng, instruction, used)
        kwargs.append(drawn)
        phrases.append(_phrase(instruction_id, drawn, rng))
    return {"prompt": " ".join([instruction.strip(), *phrases]), "instruction_id_list": ids,
            "kwargs": kwargs}
