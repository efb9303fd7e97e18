"""tasks/ifeval.py: each checker against hand-made responses with the verdicts of IFEval's
reference semantics, the judge's words, the four scores, the real prompts' file and the training
constraints."""
import json
import random
import re

import pytest

from tasks import ifeval

LESS, AT_LEAST = "less than", "at least"
PS, PPS = {"postscript_marker": "P.S."}, {"postscript_marker": "P.P.S"}
SECTIONS = {"section_spliter": "SECTION", "num_sections": 2}
NTH = {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"}
WAR_FEW = {"keyword": "war", "frequency": 2, "relation": LESS}
WAR_MANY = {"keyword": "war", "frequency": 2, "relation": AT_LEAST}
Z_MANY = {"letter": "z", "let_frequency": 2, "let_relation": AT_LEAST}
Z_FEW = {"letter": "z", "let_frequency": 2, "let_relation": LESS}
CAPS = {"capital_frequency": 2, "capital_relation": AT_LEAST}
FEW_CAPS = {"capital_frequency": 2, "capital_relation": LESS}
REPEAT = {"prompt_to_repeat": "Write a poem."}
END = {"end_phrase": "Any other questions?"}

# (instruction_id, kwargs, response, expected_pass)
CASES = [
    ("punctuation:no_comma", {}, "Hello world.", True),
    ("punctuation:no_comma", {}, "Hello, world.", False),
    ("punctuation:no_comma", {}, "It costs 1,000 dollars", False),
    ("change_case:english_lowercase", {}, "this is all lowercase and it is english.", True),
    ("change_case:english_lowercase", {}, "This is not.", False),
    ("change_case:english_lowercase", {}, "12345 !", False),  # no cased letter: islower() fails
    ("change_case:english_lowercase", {}, "das ist nicht gut und ich bin müde", False),
    ("change_case:english_capital", {}, "THIS IS ALL CAPITALS AND IT IS ENGLISH.", True),
    ("change_case:english_capital", {}, "THIS IS mostly CAPS.", False),
    ("change_case:english_capital", {}, "DAS IST NICHT GUT UND ICH BIN MÜDE", False),
    ("change_case:capital_word_frequency", CAPS, "The NASA and ESA teams met.", True),
    ("change_case:capital_word_frequency", FEW_CAPS, "The NASA and ESA teams met.", False),
    ("change_case:capital_word_frequency", CAPS, "I am A-OK.", True),  # hyphenated: one word
    ("change_case:capital_word_frequency", CAPS, "Only One Capital.", False),
    ("language:response_language", {"language": "hi"}, "यह एक अच्छा दिन है और मैं खुश हूं", True),
    ("language:response_language", {"language": "hi"}, "This is an English answer.", False),
    ("language:response_language", {"language": "de"}, "Das ist nicht gut und ich bin müde.",
     True),
    ("language:response_language", {"language": "de"}, "This is not German at all.", False),
    ("language:response_language", {"language": "ru"}, "Это хорошо, и я счастлив.", True),
    ("language:response_language", {"language": "ko"}, "Hello there", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": LESS},
     "one two three four", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": LESS},
     "one two three four five", False),  # 'less than' is strict
    ("length_constraints:number_words", {"num_words": 5, "relation": AT_LEAST},
     "one two three four five", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": AT_LEAST},
     "don't stop-me", False),  # \w+: don, t, stop, me
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": LESS},
     "One. Two.", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": LESS},
     "One. Two. Three.", False),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": AT_LEAST},
     "Mr. Smith is here.", False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": AT_LEAST},
     "Hi! How are you? Fine.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "***\nFirst.\n***\nSecond.\n***\n", True),  # empty ones at the ends are ignored
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "First.\n***\n***\nSecond.", False),  # an empty one in the middle fails
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One paragraph only.", False),
    ("length_constraints:nth_paragraph_first_word", NTH, "Intro.\n\nHowever, this works.", True),
    ("length_constraints:nth_paragraph_first_word", NTH, 'Intro.\n\n"However, yes."', True),
    ("length_constraints:nth_paragraph_first_word", NTH, "Intro.\n\nBut no.", False),
    ("length_constraints:nth_paragraph_first_word", NTH,
     "Intro.\n\nHowever it is.\n\nThird.", False),  # three paragraphs
    ("length_constraints:nth_paragraph_first_word", NTH, "Intro.\n\n\n\nHowever.", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], at [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[a][b]", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", False),
    ("detectable_content:postscript", PS, "Body.\nP.S. Thanks", True),
    ("detectable_content:postscript", PS, "Body.\np.s. thanks", True),
    ("detectable_content:postscript", PS, "Body. PS thanks", False),
    ("detectable_content:postscript", PPS, "Body.\nP.P.S. More", True),
    ("detectable_content:postscript", PPS, "Body.\nP.S. only", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "- one\n- two\n- three", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "* one\n**bold line**\n***\n- two", True),  # '**' and '***' lines are no bullets
    ("detectable_format:constrained_response", {}, "My answer is yes.", True),
    ("detectable_format:constrained_response", {}, "Yes, definitely.", False),
    ("detectable_format:constrained_response", {}, "Hmm. My answer is maybe. Because", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and *two*", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "**bold** only", False),  # counted once, by the ** pattern
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "**one** and *two*", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "* * and **", False),
    ("detectable_format:multiple_sections", SECTIONS, "SECTION 1\nA\nSECTION 2\nB", True),
    ("detectable_format:multiple_sections", SECTIONS, "Section 1\nA\nSection 2\nB", False),
    ("detectable_format:multiple_sections", SECTIONS, "SECTION 1 A", False),
    ("detectable_format:multiple_sections", SECTIONS, "SECTION 1 a SECTION 2 b SECTION 3 c", True),
    ("detectable_format:json_format", {}, '{"a": 1}', True),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("detectable_format:json_format", {}, 'Here is JSON: {"a": 1}', False),
    ("detectable_format:title", {}, "<<My Title>>\nText", True),
    ("detectable_format:title", {}, "<< >> text", False),
    ("detectable_format:title", {}, "<My Title>", False),
    ("detectable_format:title", {}, "<<a title\nbroken>>", False),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", True),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False),
    ("combination:two_responses", {}, "One.\n******\n******\nTwo.", False),
    ("combination:two_responses", {}, "Only one.", False),
    ("combination:repeat_prompt", REPEAT, "Write a poem.\nRoses are red.", True),
    ("combination:repeat_prompt", REPEAT, "  write a POEM. Roses are red.", True),
    ("combination:repeat_prompt", REPEAT, "Sure! Write a poem.", False),
    ("startend:end_checker", END, "Done. Any other questions?  \n", True),
    ("startend:end_checker", END, 'Done. any other questions?"', True),
    ("startend:end_checker", END, "Any other questions? Bye.", False),
    ("startend:quotation", {}, '"Hello world"', True),
    ("startend:quotation", {}, '  "Hello"\n', True),
    ("startend:quotation", {}, 'Hello "world"', False),
    ("startend:quotation", {}, '"', False),
    ("keywords:existence", {"keywords": ["river", "stone"]}, "A river and a stone.", True),
    ("keywords:existence", {"keywords": ["river", "stone"]}, "A River ran over Stones.", True),
    ("keywords:existence", {"keywords": ["river", "stone"]}, "A river.", False),
    ("keywords:frequency", WAR_FEW, "war and peace", True),
    ("keywords:frequency", WAR_FEW, "War, war.", False),
    ("keywords:frequency", WAR_MANY, "software warranty", True),  # substrings count
    ("keywords:frequency", WAR_MANY, "peace", False),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "I like jazz.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "Rock music!", False),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "rocky hills", True),
    ("keywords:letter_frequency", Z_MANY, "Jazz", True),
    ("keywords:letter_frequency", Z_MANY, "zebra", False),
    ("keywords:letter_frequency", Z_FEW, "ZZ top", False),  # case-insensitive
    ("keywords:letter_frequency", Z_FEW, "zebra", True),
]


def test_every_type_has_a_pass_and_a_fail():
    assert set(ifeval.SUPPORTED) == {case[0] for case in CASES} and len(ifeval.SUPPORTED) == 25
    for instruction_id in ifeval.SUPPORTED:
        verdicts = [ok for i, _, _, ok in CASES if i == instruction_id]
        assert len(verdicts) >= 3 and True in verdicts and False in verdicts, instruction_id


@pytest.mark.parametrize("instruction_id, kwargs, response, expected_pass", CASES)
def test_check(instruction_id, kwargs, response, expected_pass):
    judgment = ifeval.check(instruction_id, kwargs, "a prompt", response)
    assert (judgment is None) == expected_pass, judgment
    if judgment is not None:
        assert judgment.startswith("The instruction") and len(judgment) < 400


def test_check_refuses_an_unknown_id_and_fails_an_empty_response():
    with pytest.raises(ValueError, match="unknown"):
        ifeval.check("keywords:nonsense", {}, "p", "text")
    assert ifeval.check("punctuation:no_comma", {}, "p", "  \n") == "The response is empty."


def test_judge_names_the_broken_constraint_and_quotes_it():
    ids = ["punctuation:no_comma", "change_case:english_lowercase", "startend:end_checker"]
    kwargs = [{}, {}, END]
    assert ifeval.judge("p", ids, kwargs, "hello world. any other questions?") is None
    judgment = ifeval.judge("p", ids, kwargs, "hello, world. any other questions?")
    assert "comma" in judgment and "'hello, world." in judgment and "lowercase" not in judgment
    judgment = ifeval.judge("p", ids, kwargs, "Hello world. Bye now")
    assert "lowercase" in judgment and "'Hello world" in judgment
    assert "'Any other questions?'" in judgment and "Bye now'" in judgment
    words = ifeval.judge("p", ["length_constraints:number_words"],
                         [{"num_words": 3, "relation": LESS}], "one two three")
    assert words == "The instruction asked for fewer than 3 words; the response has 3."


def test_score_strict_and_loose_by_hand():
    records = [
        {"prompt": "a", "instruction_id_list": ["startend:quotation", "punctuation:no_comma"],
         "kwargs": [{}, {}]},
        {"prompt": "b", "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]},
        {"prompt": "c", "instruction_id_list": ["startend:end_checker", "keywords:existence"],
         "kwargs": [END, {"keywords": ["cat"]}]},
    ]
    responses = [
        'Sure, here it is:\n"Hello world"',  # strict: both fail; loose: without the first line
        "<<Title>>\nBody.",  # both pass
        "The dog.\n**Any other questions?**",  # loose: end passes without '*'; 'cat' never
    ]
    result = ifeval.score(records, responses)
    assert result["n_prompts"] == 3
    assert result["prompt_strict"] == 1 / 3 and result["instruction_strict"] == 1 / 5
    assert result["prompt_loose"] == 2 / 3 and result["instruction_loose"] == 4 / 5
    assert result["per_type"] == {
        "startend:quotation": 0.0, "punctuation:no_comma": 0.0, "detectable_format:title": 1.0,
        "startend:end_checker": 0.0, "keywords:existence": 0.0}


SAMPLE = "Sure, here is *my* answer.\n\nIt has [two] lines. P.S. bye"
SAMPLE_WORDS = {"sure", "here", "is", "my", "answer", "it", "has", "two", "lines", "p", "s", "bye"}
# whether SAMPLE breaks an instruction, read off SAMPLE by hand: one highlight, one placeholder,
# a "P.S.", its words; each of the rest it breaks whatever the arguments (no title, no JSON, a
# comma, ...). Ids left out count words, sentences or letters, which the CASES above check.
SAMPLE_BREAKS = {
    "detectable_format:number_highlighted_sections": lambda k: k["num_highlights"] > 1,
    "detectable_content:number_placeholders": lambda k: k["num_placeholders"] > 1,
    "detectable_content:postscript": lambda k: k["postscript_marker"] != "P.S.",
    "keywords:forbidden_words": lambda k: bool({w.lower() for w in k["forbidden_words"]}
                                               & SAMPLE_WORDS),
    **dict.fromkeys([
        "change_case:english_capital", "change_case:english_lowercase",
        "combination:repeat_prompt", "combination:two_responses",
        "detectable_format:constrained_response", "detectable_format:json_format",
        "detectable_format:multiple_sections", "detectable_format:number_bullet_lists",
        "detectable_format:title", "keywords:existence", "language:response_language",
        "length_constraints:nth_paragraph_first_word", "length_constraints:number_paragraphs",
        "punctuation:no_comma", "startend:end_checker", "startend:quotation"],
        lambda k: True)}


def test_the_real_prompts_parse_and_check(shared_data):
    records = ifeval.read_prompts(shared_data / "ifeval-input_data.jsonl")
    assert len(records) == 541
    assert sum(len(r["instruction_id_list"]) for r in records) == 834
    judged = 0
    for record in records:
        for instruction_id, kwargs in zip(record["instruction_id_list"], record["kwargs"]):
            assert instruction_id in ifeval.SUPPORTED
            assert ifeval.check(instruction_id, kwargs, record["prompt"], "") == (
                "The response is empty.")
            if instruction_id in SAMPLE_BREAKS:
                judgment = ifeval.check(instruction_id, kwargs, record["prompt"], SAMPLE)
                assert (judgment is not None) == SAMPLE_BREAKS[instruction_id](kwargs), (
                    instruction_id, kwargs, judgment)
                judged += 1
    assert judged > 600


GOOD_LINE = '{"key": 1, "prompt": "p", "instruction_id_list": [], "kwargs": []}'


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": ', "not JSON"),
    ('{"prompt": "p", "instruction_id_list": ["punctuation:no_comma"]}', "missing field 'kwargs'"),
    ('{"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}',
     "field 'kwargs' has 0 entries"),
    # kwargs as IFEval's checkers take them: each key known, present, of its type
    ('{"prompt": "p", "instruction_id_list": ["length_constraints:number_words"], '
     '"kwargs": [{"num_word": 5, "relation": "less than"}]}',
     "field 'kwargs', length_constraints:number_words: unknown key 'num_word'; "
     "expected the keys num_words, relation"),
    ('{"prompt": "p", "instruction_id_list": ["length_constraints:number_words"], '
     '"kwargs": [{"num_words": "5", "relation": "less than"}]}',
     "key 'num_words' must be an integer, got '5'"),
    ('{"prompt": "p", "instruction_id_list": ["keywords:frequency"], '
     '"kwargs": [{"keyword": "war", "frequency": 2, "relation": "fewer than"}]}',
     "key 'relation' must be one of 'less than', 'at least', got 'fewer than'"),
    ('{"prompt": "p", "instruction_id_list": ["keywords:existence"], '
     '"kwargs": [{"keywords": "river"}]}', "key 'keywords' must be a list of strings"),
    ('{"prompt": "p", "instruction_id_list": ["detectable_content:postscript"], '
     '"kwargs": [{"num_bullets": null}]}', "no key 'postscript_marker'"),
])
def test_read_prompts_names_the_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD_LINE}\n{bad_line}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)) \
            as error:
        ifeval.read_prompts(path)
    assert "\n" not in str(error.value)


def test_read_prompts_takes_nulls_as_absent_and_refuses_an_empty_file(tmp_path):
    path = tmp_path / "if.jsonl"
    record = {"prompt": "p", "instruction_id_list": ["keywords:existence"],  # Hugging Face's
              "kwargs": [{"keywords": ["river"], "num_words": None, "relation": None}]}
    path.write_text("\ufeff" + json.dumps(record) + "\n")  # a byte-order mark, too
    assert ifeval.read_prompts(path) == [record]
    path.write_text("\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: no records")):
        ifeval.read_prompts(path)


SIMPLE = {"punctuation:no_comma", "change_case:english_lowercase", "detectable_format:title",
          "startend:end_checker", "detectable_content:postscript", "startend:quotation",
          "detectable_content:number_placeholders", "keywords:existence"}


def _response_for(ids, kwargs, broken=None):
    """A lowercase, comma-free answer meeting every SIMPLE constraint, except `broken`."""
    given = {i: k for i, k in zip(ids, kwargs) if i != broken}
    lines = ["<<a short title>>"] if "detectable_format:title" in given else []
    lines.append("this is the answer you asked for and it is written with care")
    if "keywords:existence" in given:
        lines.append(" ".join(given["keywords:existence"]["keywords"]))
    if "detectable_content:number_placeholders" in given:
        lines.append("[one] [two] [three] [four]")
    if "detectable_content:postscript" in given:
        lines.append(given["detectable_content:postscript"]["postscript_marker"].lower() + " bye")
    if "startend:end_checker" in given:
        lines.append(given["startend:end_checker"]["end_phrase"].lower())
    if broken == "punctuation:no_comma":
        lines.append("yes, indeed")
    if broken == "change_case:english_lowercase":
        lines.append("Indeed")
    text = "\n".join(lines)
    return f'"{text}"' if "startend:quotation" in given else text


def test_add_constraints_makes_judgeable_conflict_free_records():
    rng = random.Random(0)
    instructions = ["Write a short story about a lighthouse keeper and his dog.",
                    "Explain how photosynthesis works to a ten year old.",
                    "Give me three tips for learning the guitar."]
    simple_seen = 0
    for draw in range(200):
        instruction, n = instructions[draw % 3], 1 + draw % 3
        record = ifeval.add_constraints(instruction, rng, n)
        ids, kwargs = record["instruction_id_list"], record["kwargs"]
        assert len(ids) == len(set(ids)) == len(kwargs) == n
        assert record["prompt"].startswith(instruction) and len(record["prompt"]) > len(instruction)
        for a in ids:
            assert not any(b in ifeval.CONFLICTS[a] for b in ids if b != a), ids
            assert any(t.split("{")[0] in record["prompt"] for t in ifeval.PHRASINGS[a])
        assert ifeval.judge(record["prompt"], ids, kwargs, "") == "The response is empty."
        if set(ids) <= SIMPLE:
            simple_seen += 1
            assert ifeval.judge(record["prompt"], ids, kwargs, _response_for(ids, kwargs)) is None
            broken = _response_for(ids, kwargs, broken=ids[0])
            assert ifeval.judge(record["prompt"], ids, kwargs, broken) is not None, (ids, broken)
    assert simple_seen >= 10


def test_add_constraints_repeat_prompt_is_last_and_repeats_the_rest():
    rng = random.Random(1)
    for _ in range(300):
        record = ifeval.add_constraints("Describe a cat.", rng, 2)
        if "combination:repeat_prompt" in record["instruction_id_list"]:
            break
    assert record["instruction_id_list"][-1] == "combination:repeat_prompt"
    to_repeat = record["kwargs"][-1]["prompt_to_repeat"]
    assert record["prompt"].startswith(to_repeat) and to_repeat.startswith("Describe a cat.")
    ids, kwargs = record["instruction_id_list"], record["kwargs"]
    assert "repeat" in ifeval.judge(record["prompt"], ids, kwargs, "A cat is small.")
