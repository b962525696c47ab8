"""A safe evaluator for the toy world's code tasks: integer arithmetic with + - * // and parentheses, nothing else.

The code category asks a model to evaluate or to write a tiny Python expression; an answer is checked by running
it. "Running" never means ``eval()``: the text is parsed with :mod:`ast` and walked by hand, and any node that is
not an integer literal, a unary +/-, or one of the four binary operators (a name, a call, an attribute, a string,
a float, a comparison, ``**``, ``/``, a lambda, ...) is rejected with :class:`UnsafeExpression` before anything is
computed. Sizes are bounded (text length, nesting depth, magnitude of every intermediate value), so no input can
make the evaluator slow or large.
"""
from __future__ import annotations

import ast
import re

__all__ = ["UnsafeExpression", "safe_eval", "canonical_expression", "find_expression", "find_expressions"]

MAX_CHARS = 200
MAX_DEPTH = 32
MAX_ABS = 10**12

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//"}


class UnsafeExpression(ValueError):
    """The text is not an expression of integers, + - * // and parentheses (or it is too long, deep or large)."""


def _walk(node: ast.AST, depth: int) -> int:
    if depth > MAX_DEPTH:
        raise UnsafeExpression("expression nested too deeply")
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:  # bool is a subclass of int: excluded on purpose
            raise UnsafeExpression(f"only integer literals are allowed, got {type(node.value).__name__}")
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _walk(node.operand, depth + 1)
        value = -inner if isinstance(node.op, ast.USub) else inner
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _walk(node.left, depth + 1), _walk(node.right, depth + 1)
        if isinstance(node.op, ast.Add):
            value = left + right
        elif isinstance(node.op, ast.Sub):
            value = left - right
        elif isinstance(node.op, ast.Mult):
            value = left * right
        else:
            if right == 0:
                raise UnsafeExpression("division by zero")
            value = left // right
    else:
        what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
        raise UnsafeExpression(f"{what} is not allowed (only integers, + - * // and parentheses)")
    if abs(value) > MAX_ABS:
        raise UnsafeExpression("value too large")
    return value


def safe_eval(text: str) -> int:
    """The value of an integer expression such as ``"(3 + 4) * 2"``; raises :class:`UnsafeExpression` for anything
    else. Parsing only (``ast.parse``); nothing in the text is ever executed."""
    if not isinstance(text, str):
        raise UnsafeExpression(f"expected a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise UnsafeExpression("empty expression")
    if len(text) > MAX_CHARS:
        raise UnsafeExpression(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise UnsafeExpression(f"not a Python expression: {type(e).__name__}") from None
    return _walk(tree.body, 0)


_TOKEN = re.compile(r"\d+|//|[-+*()]")
_EXPR_RUN = re.compile(r"[\d\s+\-*/()]+")


def canonical_expression(text: str) -> str:
    """The expression with one space around each operator and none inside parentheses: "(3+4)*2" -> "(3 + 4) * 2"."""
    out = " ".join(_TOKEN.findall(text))
    return out.replace("( ", "(").replace(" )", ")")


def find_expressions(text: str) -> list[str]:
    """Every run of expression characters (digits, spaces, + - * / and parentheses) that holds a digit and an
    operator, stripped, in order."""
    runs = [r.strip() for r in _EXPR_RUN.findall(text)]
    return [r for r in runs if re.search(r"\d", r) and re.search(r"\d\s*(//|[-+*])\s*[\d(]", r)]


def find_expression(text: str) -> str | None:
    """The longest expression of :func:`find_expressions`; None when there is none. Lets a verbose answer ("It is
    (3 + 4) * 2.") be checked."""
    runs = find_expressions(text)
    return max(runs, key=len) if runs else None
