"""Math answer verification: extract the final answer of a response, then decide equivalence.

Two halves, on purpose:
- cheap and in-process (this module): extraction (DAPO's `Answer:` line, the last `\\boxed{}`, a bare
  answer), normalisation, and an exact fast path (plain numbers compared as fractions, identical
  strings, text and multiple-choice answers). The embedded `arith` task and most DAPO answers
  (integers) are decided here in microseconds and never touch a worker process.
- expensive and isolated (`rewards.symbolic`, run in `rewards.pool` workers with a hard time limit):
  math-verify + sympy for everything else. A timeout or an exception scores as wrong and is counted
  (`counters()` / `pop_counters()`, logged by the trainer as `rewards/timeouts`, `rewards/errors`).

Policy (documented choices, each covered by a test): `%`, degrees, `\\text{}` units and thousands
separators are dropped; `34.0 == 34`; `0.5 == \\frac12`; a decimal never equals an irrational value
(`3.14159 != \\pi`); several candidate answers (`3 or 4`, `3, 4`, two numbers side by side) never match
a single gold answer; a partially parsed answer is not trusted; a set never equals a tuple or an
interval; units of different magnitude (`5 km` vs `5 m`) differ; in a chained equality (`x = 5+5+1 = 11`)
every member must equal the gold answer; a list matches element by element only (`4, 9, and 12` is not
`3, 8, and 12`; no path ever compares just the last item); exact values compare exactly, also inside
tuples, intervals, matrices and relations (`\\frac{1}{3^{81}} != \\frac{1}{3^{80}}`), a decimal with a
relative tolerance (`rewards.symbolic`); a response ends at a token that ends its chat turn.
Options (`rewards.policy`, per reward function): exact (default) or rounded decimals, decimal commas,
and the last-math fallback for responses without an `Answer:` line or a box.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from rewards import forms
from rewards.forms import parse_literal
from rewards.policy import Policy, resolve

__all__ = ["Verdict", "extract_answer", "normalize_answer", "parse_literal", "is_equivalent", "explain",
           "verify_batch", "counters", "pop_counters", "configure", "shutdown"]

DEFAULT_TIMEOUT = float(os.environ.get("LOOPRL_VERIFY_TIMEOUT", "5"))
DEFAULT_WORKERS = int(os.environ.get("LOOPRL_VERIFY_WORKERS", str(min(8, os.cpu_count() or 1))))
MAX_ANSWER_CHARS = 300  # longer "answers" are prose or garbage; MATH-500's longest gold is 53 chars

# ----------------------------------------------------------------------------------------- extraction

_ANCHOR = re.compile(r"(?<![A-Za-z])answer\s*(?:\*\*|__|\*)?\s*[:：]", re.IGNORECASE)
# Both kinds in one scan: group 1 set for `Answer:`; else a colon-less "Answer $ 9 $", "Answer \\[ 9 \\]",
# "the answer is $9$." that counts only when the math is all that follows on its line
_ANY_ANCHOR = re.compile(r"(?<![A-Za-z])answer\s*(?:\*\*|__|\*)?\s*(?:([:：])|(?:is\s+)?(?=\$|\\\[|\\\())",
                         re.IGNORECASE)
_MATH_SPAN = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<!\\)\$([^$\n]+?)(?<!\\)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.DOTALL)
_LINE_REST_EMPTY = re.compile(r"[\s.!*_]*(?:\n|$)")
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MATH_DELIMS = re.compile(r"\\\$|\$\$|\$|\\\(|\\\)|\\\[|\\\]")
_LEADING_PROSE = re.compile(
    r"^(?:(?:so|thus|therefore|hence)\b,?\s*)?(?:[A-Za-z][A-Za-z' ]*?\s+)?(?:is|are|equals|was|=)\s*:?\s+(.+)$",
    re.IGNORECASE)
_LONE_ASSIGNMENT = re.compile(r"\s*[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")
_SPECIAL_TOKENS = re.compile(r"<\|[^|<>\s]{1,40}\|>|</s>|<eos>|<end_of_turn>")
# End of the model's turn or start of a new one (ChatML, Llama 3, Gemma, Phi, DeepSeek): what follows was
# never meant as this response (`... so the answer is 23. <|im_start|>user ...`). Not every `<|..|>` token:
# `<|begin_of_solution|>` style markers are part of some models' answers.
_NEW_TURN = re.compile(r"<\|(?:im_start|im_end|endoftext|end_of_text|eot_id|start_header_id|end|user|assistant|"
                       r"system)\|>|</s>|<eos>|<end_of_turn>|<start_of_turn>|<｜(?:end▁of▁sentence|User|Assistant)｜>")
# "the answer is 23." / "The final answer is 23. I hope it is correct." without `$`, a box or a colon
_ANSWER_IS = re.compile(r"(?<![A-Za-z])answer\s+is\s*:?\s*", re.IGNORECASE)
# between the items of `$4$, $9$, and $12$` or `$3$ apples and $5$ pears`
_LIST_GLUE = re.compile(r"\s*(?:[,;]\s*)?(?:(?:[A-Za-z]+\s+){0,2}(?:and|or)\s+)?", re.IGNORECASE)
_PROSE_WORD = re.compile(r"[A-Za-z]{3,}")
_SENTENCE_END = re.compile(r"(?<=[^\s.])[.;!](?:\s+|$)")
_CLAUSE = re.compile(r",\s+(?=(?:because|since|which|as|so|where|when|given|assuming)\b)", re.IGNORECASE)
_PAREN_REMARK = re.compile(r"^(.*\S)\s*\(([^()]*)\)$")
_NUMBER_THEN_WORDS = re.compile(r"^([+\-−]?\d[\d,]*(?:\.\d+)?(?:\\?%)?)\s+([A-Za-z][A-Za-z\s\-'.]*)$")
# Words that turn "number + words" into several answers or a relation, so the words are not dropped.
_BLOCKING_WORDS = frozenset(
    "or and to through plus minus times but not nor except versus vs than over divided more less at least most "
    "zero one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty sixty "
    "seventy eighty ninety hundred thousand million billion half halves third thirds quarter quarters".split())


_BRACE = re.compile(r"(?<!\\)[{}]")


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of every `{` -> index just past its matching `}` (escaped braces ignored). One linear
    pass: scanning from each opening brace instead is quadratic on `\\boxed{\\boxed{...` junk."""
    stack: list[int] = []
    pairs: dict[int, int] = {}
    for match in _BRACE.finditer(text):
        if match.group() == "{":
            stack.append(match.start())
        elif stack:
            pairs[stack.pop()] = match.end()
    return pairs


def _balanced(text: str, open_index: int) -> int | None:
    """Index just past the brace that closes the `{` at open_index, or None if never closed."""
    return _brace_pairs(text).get(open_index)


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every `\\boxed{...}` / `\\fbox{...}` with balanced braces."""
    starts = list(_BOX_START.finditer(text))
    if not starts:
        return []
    pairs = _brace_pairs(text)
    spans = []
    for match in starts:
        end = pairs.get(match.end() - 1)
        if end is not None:
            spans.append((match.start(), end, text[match.end():end - 1]))
    return spans


def _unbox(text: str) -> str:
    """Replace every boxed span by its content (innermost last)."""
    for start, end, content in reversed(_boxed_spans(text)):
        text = text[:start] + content + text[end:]
    return text


def _chunk_after_anchor(rest: str) -> str:
    """The answer text after `Answer:`: rest of the line, or the next non-empty line when the line is
    empty, extended when a box or display-math block opened there spans several lines."""
    lines = rest.split("\n")
    index = next((i for i, line in enumerate(lines) if line.strip(" \t*_>") != ""), None)
    if index is None:
        return ""
    chunk = "\n".join(lines[index:])
    stripped = chunk.lstrip(" \t*_>")
    for opener, closer in (("$$", "$$"), ("\\[", "\\]")):
        if stripped.startswith(opener):
            close = stripped.find(closer, len(opener))
            if 0 < close < 2000:
                end_of_line = stripped.find("\n", close)
                return stripped[: end_of_line if end_of_line != -1 else len(stripped)]
    end = len(lines[index])
    for start, span_end, _ in _boxed_spans(chunk):
        if start < end < span_end:
            end = span_end
    end_of_line = chunk.find("\n", end)
    return chunk[: end_of_line if end_of_line != -1 else len(chunk)]


def _strip_trailing_prose(s: str) -> str:
    """Drop explanations after the answer, but only when they contain no number (which might be a
    second answer: `3. Actually 4` keeps both and then fails)."""
    for pattern in (_SENTENCE_END, _CLAUSE):
        parts = pattern.split(s, maxsplit=1)
        if len(parts) == 2 and parts[0].strip() and not re.search(r"\d", parts[1]):
            s = parts[0]
    match = _PAREN_REMARK.match(s)
    if match and not re.search(r"\d", match.group(2)) and re.search(r"(?<!\\)\b[A-Za-z]{3,}", match.group(2)):
        s = match.group(1)
    match = _NUMBER_THEN_WORDS.match(s.strip())
    if match and not _BLOCKING_WORDS.intersection(re.findall(r"[a-z]+", match.group(2).lower())):
        s = match.group(1)
    return s


def _clean_candidate(s: str) -> str:
    if len(s) > 4 * MAX_ANSWER_CHARS:  # far too long to be an answer: skip the prose heuristics
        return s.strip()
    s = _SPECIAL_TOKENS.sub(" ", s)  # when a caller decoded without skip_special_tokens
    s = s.replace("**", "").replace("`", "").strip().strip("*_").strip()
    s = _unbox(s)
    s = _MATH_DELIMS.sub(lambda m: "" if m.group(0) == "\\$" else " ", s)
    s = re.sub(r"\s+([.,;!])(?=\s|$)", r"\1", " ".join(s.split()))
    match = _LEADING_PROSE.match(s)
    # "so the total is 12" -> "12", but `y = 2x + 1` keeps its variable: it may be an equation answer
    if match and not re.search(r"\d", s[: match.start(1)]) and not _LONE_ASSIGNMENT.fullmatch(s[: match.start(1)]):
        s = match.group(1)
    s = _strip_trailing_prose(s)
    return s.strip().rstrip(".;,!").strip()


def _before_new_turn(text: str) -> str:
    """The response up to the first end-of-turn / new-turn token that follows some content."""
    if "<" not in text:
        return text
    for match in _NEW_TURN.finditer(text):
        if text[: match.start()].strip():
            return text[: match.start()]
    return text


def _anchor_ends(text: str) -> list[int]:
    """Where the answer text starts after each `Answer:` (or a colon-less `Answer $..$` whose math is
    the rest of its line), in order."""
    ends = []
    for match in _ANY_ANCHOR.finditer(text):
        if match.group(1):
            ends.append(match.end())
        elif (span := _MATH_SPAN.match(text, match.end())) and _LINE_REST_EMPTY.match(text, span.end()):
            ends.append(match.end())
    return ends


def _last_math_list(text: str, spans: list[re.Match] | None = None) -> tuple[int, str] | None:
    """(start, text) of the last `$..$` / `$$..$$` / `\\(..\\)` / `\\[..\\]` (math-verify's fallback),
    together with the math spans before it that form one list with it (`$4$, $9$, and $12$`): a list
    is never cut down to its last element."""
    spans = list(_MATH_SPAN.finditer(text)) if spans is None else spans
    if not spans:
        return None
    first = len(spans) - 1
    while first > 0 and _LIST_GLUE.fullmatch(text, spans[first - 1].end(), spans[first].start()):
        first -= 1
    if first == len(spans) - 1:
        content = next(g for g in spans[-1].groups() if g is not None).strip()
        return (spans[-1].start(), content) if content else None
    return spans[first].start(), text[spans[first].start(): spans[-1].end()]


def _bare_line(line: str) -> str:
    """A one-line response: the math of `Hence $x \\in (1,2) \\cup (3,4)$.` when words without digits
    lead to it and only punctuation follows; else the whole line."""
    spans = list(_MATH_SPAN.finditer(line)) if "$" in line or "\\(" in line or "\\[" in line else []
    if not spans or line[spans[-1].end():].strip(" .!") != "":
        return line
    found = _last_math_list(line, spans)
    if found is None:
        return line
    start, math = found
    lead = line[:start]
    if re.search(r"\d", lead) or not _PROSE_WORD.search(lead) or _MATH_SPAN.search(lead):
        return line
    return math


def _answer_phrase(text: str) -> str | None:
    """The answer after the last "answer is" (no `$`, box or colon), when it looks like an answer (a
    number, some LaTeX or a single word; prose such as "the answer is an integer" is not) and no math
    comes after it (then the phrase was a remark and the last math is the answer)."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches or _MATH_SPAN.search(text, matches[-1].end()):
        return None
    rest = text[matches[-1].end():]
    candidate = _clean_candidate(rest.split("\n", 1)[0])
    if candidate and (re.search(r"[\d\\]", candidate) or re.fullmatch(r"\(?[A-Za-z]+\)?", candidate)):
        return candidate
    return None


def _boxes_line(text: str, spans: list[tuple[int, int, str]]) -> str:
    """The boxes on the line of the last box, as one answer: `\\boxed{1}\\boxed{2}` -> `1, 2`,
    `\\boxed{(1,2)} \\cup \\boxed{(3,4)}` -> that union."""
    line_start = text.rfind("\n", 0, spans[-1][0]) + 1
    pieces: list[str] = []
    previous_end = None
    for start, end, content in (span for span in spans if span[0] >= line_start):
        union = previous_end is not None and text[previous_end:start].strip(" $") == "\\cup"
        previous_end = end
        content = content.strip()
        if content and (union or content not in pieces):
            pieces += [" \\cup " if union else ", ", content] if pieces else [content]
    return _clean_candidate("".join(pieces)) if pieces else ""


def _boxes_of_parts(spans: list[tuple[int, int, str]], candidate: str, gold_items: int) -> str | None:
    """A multi-part answer boxed part by part (`(a) \\boxed{3}` ... `(b) \\boxed{5}`) against a gold list
    of as many items: every distinct box, in order; None unless the counts agree exactly."""
    if gold_items < 2 or len(spans) < 2:
        return None
    parts = list(dict.fromkeys(c.strip() for _, _, c in spans if c.strip()))
    if len(parts) != gold_items or len(forms.top_level_items(normalize_answer(candidate))) >= gold_items:
        return None
    return _clean_candidate(", ".join(parts)) or None


def boxed_answer(text: str, spans: list[tuple[int, int, str]] | None = None) -> str | None:
    """The answer the boxes on the last box's line give (`\\boxed{1}\\boxed{2}` -> `1, 2`, boxes joined by
    `\\cup` stay a union), or None without a box (rewards/gold.py reads gold answers with it)."""
    spans = _boxed_spans(text) if spans is None else spans
    return (_boxes_line(text, spans) or None) if spans else None


def extract_answer(text: str, *, fallback: str = "last_math") -> str | None:
    """The final answer in a full model response, or None if there is none.

    The response ends at a token that ends the turn or starts a new one (`<|im_end|>`, `<|im_start|>`,
    ...). Order: the last `Answer:` line (DAPO's format; bold, `$..$`, `\\(..\\)`, boxed, trailing period
    and trailing prose tolerated; also `Answer $9$` without the colon) unless a `\\boxed{}` comes after
    it; else the last `\\boxed{}` (all boxes on that line if there are several); else the whole response
    when it is one short line (a bare answer; its math when prose leads to it); else the last "the
    answer is 23" (without `$`); else, with `fallback="last_math"`, the last math expression of the
    response (with the math before it that forms one list with it).
    """
    return _extract(text, fallback)


def _extract(text: str, fallback: str = "last_math", gold_items: int = 1) -> str | None:
    """`extract_answer`; with `gold_items` > 1 (the gold is a list) several boxes on several lines
    may form the answer, one box per item (`_boxes_of_parts`)."""
    if not isinstance(text, str) or not text.strip():
        return None
    text = _before_new_turn(text)
    anchors = _anchor_ends(text)
    spans = _boxed_spans(text)
    if anchors:
        rest = text[anchors[-1]:]
        chunk = _chunk_after_anchor(rest)
        chunk_end = anchors[-1] + rest.find(chunk) + len(chunk) if chunk else anchors[-1]
        candidate = _clean_candidate(chunk)
        if candidate and not (spans and spans[-1][0] >= chunk_end):  # a later box is the final answer
            return candidate
    if spans:
        candidate = _boxes_line(text, spans)
        if candidate and gold_items > 1:
            candidate = _boxes_of_parts(spans, candidate, gold_items) or candidate
        return candidate or None
    if anchors:
        return None
    stripped = text.strip()
    if "\n" not in stripped and len(stripped) <= 200:
        return _clean_candidate(_bare_line(stripped)) or None
    if (phrase := _answer_phrase(text)) is not None:
        return phrase
    if fallback == "last_math" and (math := _last_math_list(text)) is not None:
        return _clean_candidate(math[1]) or None
    return None


# ------------------------------------------------------------------------------------- normalisation

_UNITS = frozenset(
    "square sq cubic ways way integers integer dollars dollar mph inches inch hours hour km units unit points "
    "point feet foot ft minutes minute min digits digit cents cent degrees degree cm mm m gm g kg pounds pound "
    "lbs lb meters meter metres metre seconds second sec s days day years year miles mile students people "
    "percent liters liter ml grams gram ounces oz yards yard mm cm^2 cm^3 m^2 m^3 radians rad".split())
_TEXT_COMMANDS = re.compile(r"\\(?:text|textbf|textrm|textit|textnormal|textup|textsf|mathrm|mathbf|mathsf|mbox|hbox|"
                            r"operatorname)\s*\{")
_SPACING = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad\b|~")  # not the `\\` of matrix rows
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_ASSIGNMENT = re.compile(r"^\s*[A-Za-z](?:_\{?\w+\}?)?\s*=\s*([^=]+)$")
_MEMBERSHIP = re.compile(r"^\s*[A-Za-z](?:_\{?\w+\}?)?\s*\\in(?![A-Za-z])\s*(.+)$")  # x \in [-2, 7]
_COMMA_BANG = re.compile(r"(?<=\d),\s*\\!\s*(?=\d)")  # `32,\! 349`: LaTeX's thousands comma
_PLAIN = re.compile(r"[+-]?[\d.]*")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_UNIT_POWER = re.compile(r"^\s*\^\s*\{?[23]\}?")


def _strip_text_commands(s: str) -> str:
    """`\\text{...}`: unit words vanish (with a following ^2), any other content is kept unwrapped."""
    while match := _TEXT_COMMANDS.search(s):
        end = _balanced(s, match.end() - 1)
        if end is None:
            break
        inner = s[match.end(): end - 1].strip()
        words = re.findall(r"[A-Za-z]+", inner.lower())
        if not inner or inner in ("%", "\\%") or (words and all(w in _UNITS for w in words)
                                                    and not re.search(r"\d", inner)):
            rest = _UNIT_POWER.sub("", s[end:]) if words else s[end:]
            s = s[: match.start()] + " " + rest
        else:
            pad = " " if inner.lower() in ("and", "or") else ""  # `x=1\\text{or}x=2`: keep the word apart
            s = s[: match.start()] + pad + inner + pad + s[end:]
    return s


@functools.lru_cache(maxsize=65536)
def normalize_answer(answer: str, keep_assignment: bool = False) -> str:
    """Canonical string form of an answer (no delimiters, units, %, degrees, thousands separators; one
    spelling per relation and per matrix environment; `x = 5` -> `5` unless `keep_assignment`, which
    the caller asks for when the other side is an equation such as `2x + 4y - 3 = 0`)."""
    if len(answer) > 4 * MAX_ANSWER_CHARS:  # garbage; rejected as too long by the caller anyway
        return answer.strip()
    if _PLAIN_NUMBER.fullmatch(answer):  # most DAPO answers: nothing below would change them
        return answer
    s = _unbox(answer.strip())
    s = _MATH_DELIMS.sub(lambda m: "" if m.group(0) == "\\$" else " ", s)
    s = s.replace("−", "-").replace("–", "-").replace("\u2009", "").replace("\u00a0", " ")
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    if "\\begin" in s:
        s = forms.canonical_matrices(s)  # before \\left / \\right go: `\\left[\\begin{array}..\\right]`
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", s)
    if "\\!" in s:
        s = _COMMA_BANG.sub(",", s)
    s = re.sub(r"(?<=\d)(?:\\,|\{,\}|\\!)(?=\d{3})", "", s)  # 1\,000 and 1{,}000
    s = _SPACING.sub(" ", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _strip_text_commands(s)
    s = " ".join(s.split()).strip().rstrip(".;,").strip()
    words = s.split(" ")
    while len(words) > 1 and words[-1].lower() in _UNITS and len(words[-1]) > 1:
        words.pop()
    s = " ".join(words)
    if re.fullmatch(r"[+-]?\d{1,3}(?: \d{3})+", s):  # 1 000 000
        s = s.replace(" ", "")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if not _PLAIN.fullmatch(s):  # the new notations below never occur in a plain number
        s = forms.and_to_comma(forms.or_relations_to_union(forms.canonical_relations(s)))
        if "\\in" in s and (match := _MEMBERSHIP.match(s)) and not forms.has_relation(s):
            s = match.group(1).strip()
    if not keep_assignment and "=" in s:
        if (match := _ASSIGNMENT.match(s)) and "\\" not in s[: s.index("=")]:
            s = match.group(1).strip()
        elif (values := forms.assignment_list_values(s)) is not None:
            s = values
    if re.fullmatch(r"\(\s*[A-Ea-e]\s*\)", s):  # multiple choice "(C)"
        s = s.strip("() ")
    return s


# ---------------------------------------------------------------------------------------- fast path

_CHOICE = re.compile(r"[A-E]")
_WORDS = re.compile(r"[A-Za-z][A-Za-z' \-]*[A-Za-z]")


def _is_text(s: str) -> bool:
    return bool(_WORDS.fullmatch(s)) and sum(c.isalpha() for c in s) >= 3


_FUNCTION_WORDS = frozenset(
    "sqrt frac sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln exp lim max min gcd lcm "
    "mod pmod infty infinity undefined none dne pmatrix bmatrix matrix cdot times".split())


def _several_candidates(s: str) -> str | None:
    """Why `s` holds more than one answer or prose around numbers (math-verify would quietly pick one
    number out of `3. Actually 4`), else None."""
    words = {w.lower() for w in re.findall(r"(?<![\\A-Za-z])[A-Za-z]{4,}", s)} - _FUNCTION_WORDS
    if words and re.search(r"\d", s):
        return f"answer mixes words ({', '.join(sorted(words)[:3])}) and numbers"
    if re.search(r"\d\s+[+-]?\d", s):
        return "several numbers side by side"
    if re.search(r"\d\s*\(\s*[+-]?[\d.]+\s*\)", s):
        return "a number next to a parenthesised number (math-verify reads 2(3) as a mixed number)"
    if re.search(r"(?<![A-Za-z\\])(?:or|and)(?![A-Za-z])", s) and len(re.findall(r"\d+", s)) >= 2:
        return "several alternatives ('or' / 'and')"
    return None


def _literal_equal(p: str, g: str, p_value: Fraction, g_value: Fraction, policy: Policy) -> tuple[bool, str]:
    if p_value == g_value:
        return True, f"exact number comparison ({p_value} vs {g_value})"
    if policy.numeric_precision is not None:
        for decimal, value in ((p, g_value), (g, p_value)):
            if forms.rounded_match(decimal, value, policy.numeric_precision):
                return True, f"{decimal} is {value} rounded (numeric_precision={policy.numeric_precision})"
    return False, f"exact number comparison ({p_value} vs {g_value})"


def _compare_matrices(p: str, g: str, policy: Policy) -> tuple[bool | None, str] | None:
    p_cells, g_cells = forms.matrix_cells(p), forms.matrix_cells(g)
    if p_cells is None or g_cells is None:
        return None
    if [len(r) for r in p_cells] != [len(r) for r in g_cells]:
        return False, "matrices of different shapes"
    values = [(parse_literal(a), parse_literal(b), a, b) for pr, gr in zip(p_cells, g_cells) for a, b in zip(pr, gr)]
    if any(a is None or b is None for a, b, _, _ in values):
        return None
    for a, b, a_text, b_text in values:
        if not _literal_equal(a_text, b_text, a, b, policy)[0]:
            return False, f"matrix entry {a_text} vs {b_text}"
    return True, "matrices equal entry by entry"


def _compare_chain(members: list[str], g: str, policy: Policy) -> tuple[bool | None, str]:
    """`x = 5+5+1 = 11` against `11`: the last member is the value; every plain-number member must
    agree with it (a wrong step in the chain is not an answer). Undecided when a member needs sympy."""
    g_value = parse_literal(g)
    numbers = [(m, parse_literal(m)) for m in members if not forms.is_name(m)]
    known = [(m, v) for m, v in numbers if v is not None]
    if len({v for _, v in known}) > 1:
        return False, "the members of the chained equality differ"
    if g_value is not None and known:
        m, v = known[-1]
        equal, reason = _literal_equal(m, g, v, g_value, policy)
        if not equal or len(known) == len(numbers):
            return equal, f"chained equality: {reason}"
    return None, "needs symbolic check"


def _forms(pred: str, gold: str) -> tuple[str, str]:
    """Normalised pair; an assignment is kept (`y = ...`) when the other side is an equation."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if "=" in p and "=" not in g and g.startswith("(") and (point := forms.assignment_point(p)) is not None:
        return point, g  # `x=2, y=3` against the ordered pair `(2, 3)`
    if ("=" in p) != ("=" in g) and not forms.has_relation(p + g):
        if "=" in p and forms.chain_members(p) is None:
            g = normalize_answer(gold, keep_assignment=True)
        elif "=" in g and forms.chain_members(g) is None:
            p = normalize_answer(pred, keep_assignment=True)
    return p, g


def compare_forms(pred: str, gold: str, policy: Policy) -> tuple[bool | None, str, str, str]:
    """Decide cheaply when possible: (True/False, reason, p, g), or (None, reason, p, g) when sympy is
    needed for the normalised forms p and g."""
    p, g = _forms(pred, gold)
    if not g:
        return False, "empty gold answer", p, g
    if not p:
        return False, "empty answer", p, g
    if len(p) > MAX_ANSWER_CHARS:
        return False, f"answer longer than {MAX_ANSWER_CHARS} characters", p, g
    p_units, g_units = forms.unit_signature(pred), forms.unit_signature(gold)
    if p_units and g_units and not p_units & g_units:
        return False, f"different units ({', '.join(sorted(p_units))} vs {', '.join(sorted(g_units))})", p, g
    if p == g:
        return True, "identical after normalisation", p, g
    if forms.set_vs_tuple(p, g):  # math-verify calls {2, 3} and (2, 3) equal
        return False, "a set is not a tuple or an interval", p, g
    if g[:1] == "(" and "," in p and forms.assignment_list_values(normalize_answer(pred, keep_assignment=True)):
        return False, "values of one unknown (x=2, x=3) are not an ordered pair or interval", p, g
    if policy.decimal_comma:
        p = forms.decimal_comma_to_point(p)
    if _CHOICE.fullmatch(g):
        return p.upper() == g, "multiple-choice letter", p, g
    if _is_text(g) or _is_text(p):
        same = p.casefold().replace(" ", "") == g.casefold().replace(" ", "")
        return same, "text comparison", p, g
    if "=" in p and "=" not in g:
        members = forms.chain_members(p)
        if members is not None:
            decided, reason = _compare_chain(members, g, policy)
            return decided, reason, p, g
        if p.count("=") > 1:
            return False, "several equations", p, g
    p_value, g_value = parse_literal(p), parse_literal(g)
    if p_value is not None and g_value is not None:
        return (*_literal_equal(p, g, p_value, g_value, policy), p, g)
    if (matrices := _compare_matrices(p, g, policy)) is not None:
        return (*matrices, p, g)
    if "," not in g and "\\pm" not in g and not forms.has_relation(g) and len(forms.top_level_items(p)) > 1:
        return False, "several answers for a single gold answer", p, g
    reason = _several_candidates(p)
    if reason and not _several_candidates(g) and "," not in g:  # a listed gold makes `3 and 5` fair
        return False, reason, p, g
    return None, "needs symbolic check", p, g


def _list_length(gold: str) -> int:
    """Items in a gold answer (`3, 5` -> 2; a tuple or interval is one item)."""
    return len(forms.top_level_items(normalize_answer(gold))) if "," in gold or "and" in gold else 1


def fast_compare(pred: str, gold: str, policy: Policy | None = None) -> tuple[bool | None, str]:
    """Decide cheaply when possible: (True/False, reason), or (None, reason) when sympy is needed."""
    return compare_forms(pred, gold, policy or resolve())[:2]


# ------------------------------------------------------------------------------- pool and counters

_POOL = None
_POOL_PID: int | None = None
_POOL_LOCK = threading.Lock()
_SETTINGS = {"workers": DEFAULT_WORKERS, "timeout": DEFAULT_TIMEOUT, "start_method": None}
_COUNTS: Counter = Counter()
_SINCE_POP: Counter = Counter()
_CACHE: dict[tuple, tuple[bool, str]] = {}  # decided symbolic results (not timeouts/errors)
_CACHE_MAX = 100_000


def configure(workers: int | None = None, timeout: float | None = None, start_method: str | None = None) -> None:
    """Change the pool size / per-item limit / start method; the pool is rebuilt on next use."""
    if workers is not None:
        if workers < 1:
            raise ValueError(f"rewards.math.configure: workers must be >= 1, got {workers}")
        _SETTINGS["workers"] = workers
    if timeout is not None:
        if timeout <= 0:
            raise ValueError(f"rewards.math.configure: timeout must be > 0, got {timeout}")
        _SETTINGS["timeout"] = timeout
    if start_method is not None:
        _SETTINGS["start_method"] = start_method
    shutdown()


def get_pool():
    """The process-wide verifier pool, created on first need and reused (rebuilt after a fork)."""
    global _POOL, _POOL_PID
    from rewards.pool import WorkerPool

    if _POOL is None or _POOL_PID != os.getpid():
        _POOL = WorkerPool(_SETTINGS["workers"], start_method=_SETTINGS["start_method"])
        _POOL_PID = os.getpid()
    return _POOL


def shutdown() -> None:
    """Stop the worker processes (a later call starts new ones)."""
    global _POOL
    if _POOL is not None and _POOL_PID == os.getpid():
        _POOL.close()
    _POOL = None


atexit.register(shutdown)


def _count(key: str, n: int = 1) -> None:
    _COUNTS[key] += n
    _SINCE_POP[key] += n


def counters() -> dict[str, int]:
    """Cumulative counts: items, fast (cache hits included), symbolic, no_answer, timeouts, errors."""
    return dict(_COUNTS)


def pop_counters(prefix: str = "rewards/") -> dict[str, float]:
    """Counts since the last pop, keyed for logging (`rewards/timeouts`, ...); then reset them."""
    keys = ("items", "fast", "symbolic", "no_answer", "timeouts", "errors")
    out = {f"{prefix}{k}": float(_SINCE_POP.get(k, 0)) for k in keys}
    _SINCE_POP.clear()
    return out


# ------------------------------------------------------------------------------------------ verdicts


@dataclass
class Verdict:
    """Why a response scored as it did: what was extracted, the decision and the path that made it."""

    extracted: str | None
    correct: bool
    reason: str
    path: str  # "none" (no answer) | "fast" | "symbolic" | "cached" | "timeout" | "error"


def verify_batch(responses: list[str], ground_truths: list[str], *, timeout: float | None = None,
                 inline: bool = False, policy: Policy | str | None = None, extracted: bool = False) -> list[Verdict]:
    """Verdicts for many (response, gold) pairs. Undecided pairs go to the worker pool in one batch
    (hard `timeout` seconds each); `inline=True` runs sympy in this process instead (no hard limit;
    for benchmarks and debugging only). `policy`: "exact" (default), "rounded" or a `Policy`.
    `extracted=True`: the responses are final answers already (no extraction; maj@k compares the
    answers of one prompt with each other this way)."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"verify_batch: {len(responses)} responses but {len(ground_truths)} ground truths")
    policy = policy if isinstance(policy, Policy) else resolve(policy, where="verify_batch")
    timeout = _SETTINGS["timeout"] if timeout is None else timeout
    verdicts: list[Verdict | None] = [None] * len(responses)
    extracted_all = list(responses) if extracted else \
        [_extract(response, policy.fallback, _list_length(str(gold)) if "box" in response else 1)
         for response, gold in zip(responses, ground_truths)]
    slow: dict[tuple, list[int]] = {}
    for i, (extracted, gold) in enumerate(zip(extracted_all, ground_truths)):
        if extracted is None:
            verdicts[i] = Verdict(None, False, "no answer found", "none")
            continue
        decided, reason, p, g = compare_forms(extracted, str(gold), policy)
        if decided is not None:
            verdicts[i] = Verdict(extracted, decided, reason, "fast")
            continue
        key = (p, g, policy.numeric_precision)
        if key in _CACHE:
            equal, reason = _CACHE[key]
            verdicts[i] = Verdict(extracted, equal, reason, "cached")
        else:
            slow.setdefault(key, []).append(i)
    _count("items", len(responses))
    _count("no_answer", sum(v is not None and v.path == "none" for v in verdicts))
    _count("fast", sum(v is not None and v.path in ("fast", "cached") for v in verdicts))
    if slow:
        _run_symbolic(slow, extracted_all, verdicts, timeout, inline)
    return [v for v in verdicts if v is not None]


def _run_symbolic(slow: dict[tuple, list[int]], extracted: list[str | None], verdicts: list[Verdict | None],
                  timeout: float, inline: bool) -> None:
    from rewards.pool import TaskResult

    keys = list(slow)
    if inline:
        from rewards.symbolic import symbolic_equal

        results = []
        for key in keys:
            try:
                results.append(TaskResult(True, value=symbolic_equal(*key)))
            except Exception as exc:  # noqa: BLE001  (same contract as the pool: an error scores as wrong)
                results.append(TaskResult(False, error=f"{type(exc).__name__}: {exc}"))
    else:  # by name, so this process never imports sympy / math-verify
        with _POOL_LOCK:
            results = get_pool().map("rewards.symbolic:symbolic_equal", keys, timeout=timeout)
    for key, result in zip(keys, results):
        indices = slow[key]
        _count("symbolic", len(indices))
        if result.ok:
            equal, reason = result.value
            if len(_CACHE) < _CACHE_MAX:
                _CACHE[key] = (equal, reason)
            path = "symbolic"
        else:
            equal, reason = False, result.error or "error"
            path = "timeout" if result.timed_out else "error"
            _count("timeouts" if result.timed_out else "errors", len(indices))
        for i in indices:
            verdicts[i] = Verdict(extracted[i], equal, reason, path)


def explain(response: str, ground_truth: str, *, timeout: float | None = None,
            policy: Policy | str | None = None) -> Verdict:
    """One verdict with its reason (what `looprl reward` prints)."""
    return verify_batch([response], [ground_truth], timeout=timeout, policy=policy)[0]


def is_equivalent(response: str, ground_truth: str, *, timeout: float | None = None,
                  policy: Policy | str | None = None) -> bool:
    """Does the final answer of `response` equal `ground_truth`? Timeouts and errors count as False."""
    return explain(response, ground_truth, timeout=timeout, policy=policy).correct
