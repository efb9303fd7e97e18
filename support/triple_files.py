"""Triple files: the CUT authors' release, Shepherd's critiques and plain records, JSON or JSONL,
read into Triples (data.py makes them ids) with one clear message per bad file, record or field.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

FAILED_JUDGE = "$ERROR$"  # the authors' data marks a failed judge call so: no judgment to train on


@dataclass(frozen=True)
class Triple:
    instruction: str
    response: str
    judgment: str | None  # None: the response is acceptable
    refinement: str | None = None  # a better response (ILF); a preference pair's chosen one


def _triple(rec, where: str) -> Triple | None:
    """One record of any supported format as a Triple; None for a failed judge call ($ERROR$)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")

    def field(name, nullable=False):
        if name not in rec:
            raise ValueError(f"{where}: missing field '{name}'")
        value = rec[name]
        if isinstance(value, str) or (nullable and value is None):
            if name == "judgment" and value and not value.strip():  # "" or null: acceptable
                raise ValueError(f"{where}: field 'judgment' holds only spaces (null: acceptable)")
            return value
        or_null = " or null" if nullable else ""
        raise ValueError(f"{where}: field '{name}' must be a string{or_null}, "
                         f"got {type(value).__name__}")

    if "question" in rec:  # Shepherd: every answer is flawed, the feedback says why
        if not field("feedback").strip():
            raise ValueError(f"{where}: field 'feedback' is empty "
                             "(a Shepherd answer needs its critique)")
        if rec["feedback"] == FAILED_JUDGE:
            return None
        return Triple(field("question"), field("answer"), rec["feedback"])
    if "output" in rec:  # the CUT authors' release (Alpaca style)
        instruction = field("instruction")
        response = field("output")
        judgment = field("judgment", nullable=True)
        extra = field("input", nullable=True) if "input" in rec else None
        score = rec.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise ValueError(f"{where}: field 'score' must be a number or null, "
                             f"got {type(score).__name__}")
        if judgment == FAILED_JUDGE:
            return None
        # the release marks an acceptable response by no judgment, "Perfect..." or a score >= 7
        if not judgment or judgment.startswith("Perfect") or (score is not None and score >= 7):
            judgment = None
        if extra:
            instruction = instruction + "\n" + extra
        return Triple(instruction, response, judgment)
    if "response" in rec:
        judgment = field("judgment", nullable=True) or None
        if judgment == FAILED_JUDGE:
            return None
        refinement = field("refinement", nullable=True) if "refinement" in rec else None
        return Triple(field("instruction"), field("response"), judgment, refinement)
    if "chosen" in rec:  # a preference pair, as TRL and Anthropic's HH data write them
        return Triple(field("prompt"), field("rejected"), None, field("chosen"))
    raise ValueError(f"{where}: unknown record, expected the fields instruction/input/output/"
                     "judgment, question/answer/feedback, instruction/response/judgment"
                     f"(/refinement) or prompt/chosen/rejected; got {sorted(rec)}")


def data_hash(data):
    """sha256 of a triples file's bytes, or 'builtin': a resumed run or an eval checks its data."""
    return "builtin" if data == "builtin" else hashlib.sha256(Path(data).read_bytes()).hexdigest()


def read_text(path, what="file"):
    """A UTF-8 text file, without a byte-order mark; one clear error naming the file otherwise."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_triples(path, verbose=True) -> list[Triple]:
    """Triples from a JSON list or JSONL file: the authors' release, Shepherd's, plain records."""
    text = read_text(path, "triples file")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise ValueError(f"{path}: not a valid JSON list ({e})") from None
        records = None  # JSONL, a record per line, is not one JSON value
    if isinstance(records, dict) and "\n" in text.strip():
        raise ValueError(f"{path}: one JSON object; expected a list of records, "
                         "or JSONL (a record per line)")
    if isinstance(records, list):
        located = [(rec, f"{path}: record {i}") for i, rec in enumerate(records)]
    else:
        located = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    located.append((json.loads(line), f"{path}: line {n}"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
    parsed = [_triple(rec, where) for rec, where in located]
    triples = [t for t in parsed if t is not None]
    if not triples:
        raise ValueError(f"{path}: no usable triples in {len(located)} records")
    n_flawed = sum(t.judgment is not None for t in triples)
    n_better = sum(t.refinement is not None for t in triples)
    better = f", {n_better} with a refinement or a chosen response" if n_better else ""
    if verbose:
        print(f"{Path(path).name}: loaded {len(triples)} triples "
              f"({len(triples) - n_flawed} acceptable, {n_flawed} flawed{better}), "
              f"dropped {len(parsed) - len(triples)} with a failed judge call ({FAILED_JUDGE})")
    return triples
