"""Final-answer extraction and equality, shared by every domain and by evaluation.

Equality is tiered so the common case stays cheap: exact string, normalized string, exact rational
arithmetic, and only then sympy (imported lazily, on a whitelisted token stream we build ourselves, so
model output is never ``eval``-ed and pathological input cannot hang). ``sympy.parsing.latex`` needs
antlr4/lark, which we do not depend on, hence the small LaTeX-to-sympy converter below.
``answers_equal`` never raises: anything unparseable is simply "not equal".
"""

from __future__ import annotations

import cmath
import functools
import random
import re
from fractions import Fraction
from typing import Any

__all__ = ["extract_boxed", "extract_final_answer", "normalize_answer", "answers_equal"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _balanced(text: str, open_index: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``open_index`` and the index just past it."""
    depth = 0
    for i in range(open_index, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i], i + 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (balanced braces), or None.

    The last one wins because models restate or revise answers; ``\\boxed 5`` (no braces) is accepted.
    """
    if not text:
        return None
    pos = len(text)
    while True:
        start = max(text.rfind(cmd, 0, pos) for cmd in _BOX_COMMANDS)
        if start < 0:
            return None
        cmd = "\\boxed" if text.startswith("\\boxed", start) else "\\fbox"
        i = start + len(cmd)
        if i < len(text) and text[i] == "{":
            group = _balanced(text, i)
            if group is not None and group[0].strip():
                return group[0].strip()
        elif i < len(text) and text[i] == " ":
            match = re.match(r" +([^\s$]+)", text[i:])
            if match and match.group(1).rstrip("."):
                return match.group(1).rstrip(".")
        pos = start  # unbalanced, empty, or another command (\boxedx): try an earlier box


_GSM8K = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)
_ANSWER_IS = re.compile(
    r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE
)


def extract_final_answer(text: str | None) -> str | None:
    """The final answer a text commits to: last box, else GSM8K ``#### N``, else "The answer is X"."""
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    matches = _GSM8K.findall(text)
    if matches:
        return matches[-1]
    matches = _ANSWER_IS.findall(text)
    if matches:
        answer = re.split(r"\.\s", matches[-1], maxsplit=1)[0]  # cut a following sentence, keep 3.5
        answer = answer.strip().rstrip(".").strip().strip("$").strip()
        return answer or None
    return None


# --------------------------------------------------------------------------------------------------
# normalization

_TEXT_CMD = r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)"
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad")


_MATRIX = re.compile(r"\\begin\{([pbv]?matrix)\}(.*?)\\end\{\1\}", re.DOTALL)


def _matrix_as_tuple(match: re.Match[str]) -> str:
    """A column vector becomes ``(a,b,c)``, a matrix ``((a,b),(c,d))``: comparable as tuples."""
    rows = [row.strip() for row in match.group(2).split("\\\\") if row.strip()]
    cells = [[cell.strip() for cell in row.split("&")] for row in rows]
    if all(len(row) == 1 for row in cells):
        return "(" + ",".join(row[0] for row in cells) + ")"
    return "(" + ",".join("(" + ",".join(row) + ")" for row in cells) + ")"


def normalize_answer(s: str | None) -> str:
    """Canonical surface form: no ``$``, ``\\text{}``, ``\\left``/``\\right``, spaces, thousands commas.

    Units written as ``5\\text{ cm}`` are dropped; a whole-answer ``\\text{even}`` keeps its word.
    """
    if s is None:
        return ""
    s = s.strip()
    boxed = extract_boxed(s) if ("\\boxed" in s or "\\fbox" in s) else None
    if boxed:
        s = boxed
    s = s.replace("\\$", "").replace("$", "")
    s = _MATRIX.sub(_matrix_as_tuple, s)  # before spacing commands: its row separator is a backslash pair
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\\left\b|\\right\b|\\big[lr]?\b|\\Big[lr]?\b", "", s)
    s = re.sub(r"\\[dt]frac\b", r"\\frac", s)
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree", "", s)
    s = s.replace("\\%", "%").replace("{,}", ",")
    s = s.replace("\\{", "{").replace("\\}", "}")
    whole = re.fullmatch(_TEXT_CMD + r"\s*\{(.*)\}", s.strip(), re.DOTALL)
    if whole and _balanced(s.strip(), s.strip().index("{")) == (whole.group(1), len(s.strip())):
        s = whole.group(1)
    # a trailing unit after a number: 5\text{ cm}, 12 \mbox{inches}
    s = re.sub(r"(?<=[\d}])\s*" + _TEXT_CMD + r"\s*\{[^{}]*\}\s*$", "", s)
    s = re.sub(_TEXT_CMD + r"\s*\{([^{}]*)\}", r"\1", s)
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"\s+", "", s)
    if _THOUSANDS.fullmatch(s.rstrip("%")):
        s = s.replace(",", "")
    # "x = 3" -> "3" (a single assignment to a single variable)
    match = re.fullmatch(r"[a-zA-Z]=([^=<>]+)", s)
    if match:
        s = match.group(1)
    return s


# --------------------------------------------------------------------------------------------------
# exact numbers

_INT_OR_DEC = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_SLASH_FRACTION = re.compile(r"([-+]?\d+)/([-+]?\d+)")
_LATEX_FRACTION = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_MIXED_NUMBER = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_MAX_DIGITS = 60  # longer numerals are not answers; refuse rather than do big arithmetic


def _as_fraction(s: str) -> Fraction | None:
    """Exact value of a plain integer, decimal, ``a/b`` or ``\\frac{a}{b}``; None otherwise."""
    if len(s) > _MAX_DIGITS:
        return None
    try:
        if _INT_OR_DEC.fullmatch(s):
            return Fraction(s)
        match = _SLASH_FRACTION.fullmatch(s)
        if match:
            return Fraction(int(match.group(1)), int(match.group(2)))
        match = _LATEX_FRACTION.fullmatch(s)
        if match:
            value = Fraction(int(match.group(2)), int(match.group(3)))
            return -value if match.group(1) else value
        match = _MIXED_NUMBER.fullmatch(s)
        if match:
            value = int(match.group(2)) + Fraction(int(match.group(3)), int(match.group(4)))
            return -value if match.group(1) else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _number_with_percent(s: str) -> tuple[Fraction | None, bool]:
    if s.endswith("%"):
        return _as_fraction(s[:-1]), True
    return _as_fraction(s), False


# --------------------------------------------------------------------------------------------------
# LaTeX -> sympy string (whitelisted tokens only)

_FUNCS = {"sqrt", "sin", "cos", "tan", "ln", "log", "exp", "sec", "csc", "cot", "arcsin", "arccos", "arctan"}
_CONSTS = {"pi": "pi", "infty": "oo", "infinity": "oo"}
_LATEX_OPS = {"cdot": "*", "times": "*", "div": "/", "ast": "*"}
_SKIP_CMDS = {"left", "right", "displaystyle", "mathrm", "text", "mathbf", "textbf"}
_MAX_SYMPY_CHARS = 200
_MAX_EXPONENT = 500


class _Unparseable(Exception):
    pass


def _read_arg(s: str, i: int) -> tuple[str, int]:
    """One macro argument: a brace group, a command, or a single character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise _Unparseable("missing argument")
    if s[i] == "{":
        group = _balanced(s, i)
        if group is None:
            raise _Unparseable("unbalanced braces")
        return group
    if s[i] == "\\":
        match = re.match(r"\\[a-zA-Z]+", s[i:])
        if match:
            return match.group(0), i + len(match.group(0))
    return s[i], i + 1


def _tokens(s: str, depth: int = 0) -> list[tuple[str, str]]:
    """Token list (kind, text) with kinds NUM, NAME, FUNC, OP, LP, RP."""
    if depth > 20:
        raise _Unparseable("nesting too deep")
    out: list[tuple[str, str]] = []

    def group(inner: str) -> None:
        out.append(("LP", "("))
        out.extend(_tokens(inner, depth + 1))
        out.append(("RP", ")"))

    i = 0
    while i < len(s):
        ch = s[i]
        if ch.isspace():
            i += 1
        elif ch.isdigit() or (ch == "." and i + 1 < len(s) and s[i + 1].isdigit()):
            match = re.match(r"\d*\.?\d*", s[i:])
            assert match is not None
            text = match.group(0)
            if len(text) > _MAX_DIGITS:
                raise _Unparseable("numeral too long")
            out.append(("NUM", text))
            i += len(text)
        elif ch.isalpha():
            match = re.match(r"[a-zA-Z]+", s[i:])
            if match is None:
                raise _Unparseable(f"unexpected character {ch!r}")
            word = match.group(0)
            i += len(word)
            if word in _FUNCS:
                out.append(("FUNC", word))
            elif word in _CONSTS:
                out.append(("NAME", _CONSTS[word]))
            else:
                out.extend(("NAME", letter) for letter in word)  # "xy" is x*y
        elif ch == "\\":
            match = re.match(r"\\([a-zA-Z]+|.)", s[i:])
            if match is None:
                raise _Unparseable("dangling backslash")
            cmd = match.group(1)
            i += len(match.group(0))
            if cmd == "frac":
                num, i = _read_arg(s, i)
                den, i = _read_arg(s, i)
                out.append(("LP", "("))
                group(num)
                out.append(("OP", "/"))
                group(den)
                out.append(("RP", ")"))
            elif cmd == "sqrt":
                index = None
                if i < len(s) and s[i] == "[":
                    close = s.find("]", i)
                    if close < 0:
                        raise _Unparseable("unclosed root index")
                    index, i = s[i + 1 : close], close + 1
                arg, i = _read_arg(s, i)
                if index is None:
                    out.append(("FUNC", "sqrt"))
                    group(arg)
                else:
                    out.append(("LP", "("))
                    group(arg)
                    out.append(("OP", "**"))
                    out.append(("LP", "("))
                    out.append(("NUM", "1"))
                    out.append(("OP", "/"))
                    group(index)
                    out.append(("RP", ")"))
                    out.append(("RP", ")"))
            elif cmd in _FUNCS:
                out.append(("FUNC", cmd))
            elif cmd in _CONSTS:
                out.append(("NAME", _CONSTS[cmd]))
            elif cmd in _LATEX_OPS:
                out.append(("OP", _LATEX_OPS[cmd]))
            elif cmd in _SKIP_CMDS or cmd in {",", ";", "!", " ", ":"}:
                pass
            else:
                raise _Unparseable(f"unsupported command \\{cmd}")
        elif ch == "{":
            inner, i = _read_arg(s, i)
            group(inner)
        elif ch in "([":
            out.append(("LP", "("))
            i += 1
        elif ch in ")]":
            out.append(("RP", ")"))
            i += 1
        elif ch == "^":
            arg, i = _read_arg(s, i + 1)
            out.append(("OP", "**"))
            group(arg)
        elif ch in "+-*/":
            if ch == "*" and s.startswith("**", i):
                out.append(("OP", "**"))
                i += 2
            else:
                out.append(("OP", ch))
                i += 1
        else:
            raise _Unparseable(f"unexpected character {ch!r}")
    return out


def _latex_to_sympy_string(s: str) -> str:
    """A Python expression over whitelisted names with explicit ``*`` for implicit products."""
    tokens = _tokens(s)
    if not tokens:
        raise _Unparseable("empty")
    pieces: list[str] = []
    prev = ""
    for kind, text in tokens:
        if prev in ("NUM", "NAME", "RP") and kind in ("NUM", "NAME", "FUNC", "LP"):
            pieces.append("*")
        if prev == "FUNC" and kind != "LP":
            raise _Unparseable("function without parenthesised argument")
        pieces.append(text)
        prev = kind
    out = "".join(pieces)
    if len(out) > _MAX_SYMPY_CHARS:
        raise _Unparseable("too long")
    return out


@functools.lru_cache(maxsize=1)
def _sympy() -> Any:
    import sympy  # heavy: only paid by callers that reach the symbolic tier

    return sympy


@functools.lru_cache(maxsize=4096)
def _to_sympy(s: str) -> Any:
    """Parsed sympy expression (unevaluated, so no big-integer arithmetic happens), or None."""
    try:
        code = _latex_to_sympy_string(s)
    except _Unparseable:
        return None
    sp = _sympy()
    names: dict[str, Any] = {name: sp.Symbol(name) for name in "abcdfghjklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    names.update(
        e=sp.E, i=sp.I, pi=sp.pi, oo=sp.oo, sqrt=sp.sqrt, sin=sp.sin, cos=sp.cos, tan=sp.tan,
        sec=sp.sec, csc=sp.csc, cot=sp.cot, arcsin=sp.asin, arccos=sp.acos, arctan=sp.atan,
        ln=sp.log, log=sp.log, exp=sp.exp,
    )
    try:
        # safe to hand to parse_expr: the string holds only our whitelisted tokens
        expr = sp.parse_expr(code, local_dict=names, evaluate=False)
    except Exception:  # noqa: BLE001 - any parse failure means "not comparable"
        return None
    if not _exponents_small(expr):
        return None
    return expr


def _exponents_small(expr: Any) -> bool:
    """Refuse towers like 9^9^9 whose evaluation would not finish."""
    sp = _sympy()
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Pow):
            exponent = node.exp
            if exponent.is_Number and abs(exponent) > _MAX_EXPONENT:
                return False
            if any(isinstance(sub, sp.Pow) for sub in sp.preorder_traversal(exponent)) and not exponent.free_symbols:
                try:
                    if abs(complex(exponent.evalf(15))) > _MAX_EXPONENT:
                        return False
                except (TypeError, ValueError, OverflowError):
                    return False
    return True


_PROBE_RNG = random.Random(20240601)  # fixed, so equality is deterministic across runs and processes
_PROBE_POINTS = [[_PROBE_RNG.uniform(0.3, 2.7) for _ in range(64)] for _ in range(3)]


def _numeric(expr: Any, subs: dict[Any, float]) -> complex | None:
    try:
        value = complex(expr.evalf(20, subs=subs))
    except Exception:  # noqa: BLE001 - nan, zoo, symbolic leftovers
        return None
    if cmath.isnan(value):
        return None
    return value


def _close(a: complex, b: complex) -> bool:
    if cmath.isinf(a) or cmath.isinf(b):
        return a == b
    return cmath.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _sympy_equal(a: str, b: str) -> bool:
    """Equivalent as expressions: numerically equal at several fixed pseudo-random points."""
    ea, eb = _to_sympy(a), _to_sympy(b)
    if ea is None or eb is None:
        return False
    try:
        symbols = sorted(ea.free_symbols | eb.free_symbols, key=str)
        if ea.free_symbols != eb.free_symbols:
            return False
        points = _PROBE_POINTS if symbols else _PROBE_POINTS[:1]
        for point in points:
            subs = dict(zip(symbols, point))
            va, vb = _numeric(ea, subs), _numeric(eb, subs)
            if va is None or vb is None or not _close(va, vb):
                return False
        return True
    except Exception:  # noqa: BLE001 - never let sympy escape answers_equal
        return False


# --------------------------------------------------------------------------------------------------
# equality


def _split_top_level(s: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _bracketed_parts(s: str) -> tuple[str, list[str]] | None:
    """``(a,b)`` / ``[a,b)`` / ``{a,b}`` -> (bracket pair, parts) when it has a top-level comma."""
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        inner = s[1:-1]
        parts = _split_top_level(inner)
        depth_ok = all(p.count("(") + p.count("[") + p.count("{") == p.count(")") + p.count("]") + p.count("}")
                       for p in parts)
        if len(parts) > 1 and depth_ok:
            return s[0] + s[-1], parts
    return None


def _scalar_equal(p: str, t: str) -> bool:
    if p == t or p.lower() == t.lower():
        return True
    (fp, p_pct), (ft, t_pct) = _number_with_percent(p), _number_with_percent(t)
    if fp is not None and ft is not None:
        if fp == ft:
            return True
        if p_pct != t_pct:  # 50% vs 0.5
            return (fp / 100 if p_pct else fp) == (ft / 100 if t_pct else ft)
        return False
    if p.endswith("%") or t.endswith("%"):
        p, t = p.rstrip("%"), t.rstrip("%")
    return _sympy_equal(p, t)


def _normalized_equal(p: str, t: str) -> bool:
    if p == t:
        return True
    bp, bt = _bracketed_parts(p), _bracketed_parts(t)
    # a tuple "(a,b)" against the bare list "a,b" (OlympiadBench writes tuples that way): in order
    if bp is not None and bt is None and bp[0] == "()":
        bt = ("()", _split_top_level(t))
    elif bt is not None and bp is None and bt[0] == "()":
        bp = ("()", _split_top_level(p))
    if bp is not None or bt is not None:
        if bp is None or bt is None or bp[0] != bt[0] or len(bp[1]) != len(bt[1]):
            return False
        return all(_scalar_equal(x, y) for x, y in zip(bp[1], bt[1]))
    lp, lt = _split_top_level(p), _split_top_level(t)
    if len(lp) > 1 or len(lt) > 1:  # "2,3" lists several solutions: order does not matter
        if len(lp) != len(lt):
            return False
        remaining = list(lt)
        for x in lp:
            match = next((k for k, y in enumerate(remaining) if _scalar_equal(x, y)), None)
            if match is None:
                return False
            remaining.pop(match)
        return True
    return _scalar_equal(p, t)


def answers_equal(predicted: str | None, truth: str | None) -> bool:
    """Whether two final answers agree: normalized text, then exact numbers, then sympy equivalence.

    Never raises; None or unparseable input compares unequal.
    """
    if predicted is None or truth is None:
        return False
    if predicted == truth:
        return bool(predicted.strip())
    try:
        p, t = normalize_answer(predicted), normalize_answer(truth)
        if not p or not t:
            return False
        return _normalized_equal(p, t)
    except Exception:  # noqa: BLE001 - the contract is "False on anything unparseable"
        return False
