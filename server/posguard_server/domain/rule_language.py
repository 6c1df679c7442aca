"""The rule language: conditions over a transaction, written as CEL expressions, compiled once to closures.

The language is a small subset of CEL (Common Expression Language, github.com/google/cel-spec), with CEL's
syntax and precedence, so a rule reads the same to anyone who knows CEL:

    txn.amount > 500 && txn.mcc in ["7995", "6051"] && customer.count_1h >= 3
    risk_score >= 0.7 || (customer.new_terminal && txn.hour < 6)

Literals are numbers, strings (double or single quotes), ``true`` and ``false``; operators are ``!`` and
unary ``-``, ``*``, ``+`` and ``-``, the comparisons ``== != < <= > >=``, ``in`` a list of literals,
``&&`` and ``||``. There are no functions, macros, maps or division: nothing that loops, allocates
without bound or fails while evaluating. Integers and doubles are one kind, "number" (CEL would ask for a
conversion).
The variables are a fixed table (``VARIABLES``), each with its kind; a name outside it, a comparison of a
string with a number, or a condition that is not true-or-false is refused when the rule is compiled, with
the line and column of the fault.

Why not a CEL library: the pure-Python one evaluated a two-clause rule in about 300 µs and the Rust-backed
one in about 16 µs (measured here), so 50 rules would have cost more than scoring itself; these closures
cost well under 1 µs per clause. Parsing uses lark (an LALR parser with positions); nothing is ever passed
to ``eval``: each node of the parsed tree becomes a Python closure over constants and variable names.
"""

from __future__ import annotations

import enum
import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

# Long enough for any rule a person writes; bounds the parser's and the compiler's work.
MAX_EXPRESSION_LENGTH: Final = 2000
MAX_DEPTH: Final = 64


class Kind(enum.Enum):
    NUMBER = "number"
    STRING = "string"
    BOOL = "bool"


# Every variable a rule may name: its kind and what it means (docs/rules.md repeats this table).
VARIABLES: Final[Mapping[str, tuple[Kind, str]]] = {
    "txn.amount": (Kind.NUMBER, "amount in major units of its currency (12.90)"),
    "txn.amount_minor": (Kind.NUMBER, "amount in minor units (1290)"),
    "txn.currency": (Kind.STRING, "ISO 4217 code, upper case"),
    "txn.channel": (Kind.STRING, 'channel, lower case: "pos", "online", "mobile" or ""'),
    "txn.mcc": (Kind.STRING, 'merchant category code, four digits or ""'),
    "txn.merchant_id": (Kind.STRING, "merchant id"),
    "txn.terminal_id": (Kind.STRING, 'terminal id or ""'),
    "txn.hour": (Kind.NUMBER, "hour of the event time in the policy time zone, 0-23"),
    "txn.weekday": (Kind.NUMBER, "day of the week of the event time in the policy time zone, 1 (Monday)-7"),
    "customer.history": (Kind.NUMBER, "the customer's earlier transactions in history"),
    "customer.typical_amount": (
        Kind.NUMBER,
        "the customer's usual amount (geometric mean, major units) before this one; 0 without history",
    ),
    "customer.count_10m": (Kind.NUMBER, "the customer's transactions in the 10 minutes before this one"),
    "customer.count_1h": (Kind.NUMBER, "the same over 1 hour"),
    "customer.count_24h": (Kind.NUMBER, "the same over 24 hours"),
    "customer.spend_10m": (Kind.NUMBER, "the customer's spend (major units) in the 10 minutes before"),
    "customer.spend_1h": (Kind.NUMBER, "the same over 1 hour"),
    "customer.spend_24h": (Kind.NUMBER, "the same over 24 hours"),
    "customer.new_merchant": (Kind.BOOL, "the customer never paid at this merchant before"),
    "customer.new_terminal": (Kind.BOOL, "the customer never paid at this terminal before"),
    "number.failed_verifications": (Kind.NUMBER, "failed verifications of the customer's numbers"),
    "number.refused_codes": (Kind.NUMBER, "dynamic codes of the customer refused as replayed"),
    "number.days_since_rotation": (
        Kind.NUMBER,
        "days since the customer's number was last rotated (100000 when it never was)",
    ),
    "risk_score": (Kind.NUMBER, "the model's risk score, 0-1 (0 when no model scored)"),
    "model.decision": (Kind.STRING, 'the model\'s decision: "APPROVE", "REVIEW" or "DECLINE"'),
}

_GRAMMAR = r"""
?start: or_test
?or_test: and_test | or_test "||" and_test -> or_
?and_test: relation | and_test "&&" relation -> and_
?relation: sum | sum REL_OP sum -> compare | sum "in" list -> in_
?sum: product | sum ADD_OP product -> arith
?product: unary | product "*" unary -> mul
?unary: atom | "-" unary -> neg | "!" unary -> not_
?atom: NUMBER -> number
     | STRING -> string
     | "true" -> true
     | "false" -> false
     | name
     | "(" or_test ")"
name: IDENT ("." IDENT)*
list: "[" [literal ("," literal)*] "]"
?literal: NUMBER -> number | STRING -> string | "-" NUMBER -> neg_number
REL_OP: "==" | "!=" | "<=" | ">=" | "<" | ">"
ADD_OP: "+" | "-"
IDENT: /[A-Za-z_][A-Za-z0-9_]*/
NUMBER: /\d+(\.\d+)?([eE][+-]?\d+)?/
STRING: /"(?:[^"\\\n]|\\.)*"/ | /'(?:[^'\\\n]|\\.)*'/
%ignore /[ \t\r\n]+/
"""


@functools.cache
def _parser() -> Lark:
    """The rule parser, built on first use: building its tables takes about 0.1 s, which every process that
    imports this module (each command of ``posguard-server``) paid at start-up, rules or not."""
    return Lark(_GRAMMAR, parser="lalr", propagate_positions=True, maybe_placeholders=False)


# A compiled condition takes the facts (variable name → value) and says whether the rule fires.
Facts = Mapping[str, Any]
Condition = Callable[[Facts], bool]
_Fn = Callable[[Facts], Any]

_COMPARE: Final[Mapping[str, Callable[[Any, Any], bool]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class RuleSyntaxError(ValueError):
    """A rule that does not compile: what is wrong, and where (1-based line and column)."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.message = message
        self.line = line
        self.column = column


@dataclass(frozen=True, slots=True)
class Compiled:
    """A rule's condition, ready to run, and the variables it reads."""

    condition: Condition
    variables: frozenset[str]


def compile_condition(source: str) -> Compiled:
    """Parse, check and compile ``source``; RuleSyntaxError (with its position) when it does not compile."""
    if not source.strip():
        raise RuleSyntaxError("the condition is empty", 1, 1)
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise RuleSyntaxError(f"the condition is longer than {MAX_EXPRESSION_LENGTH} characters", 1, 1)
    try:
        tree = _parser().parse(source)
    except UnexpectedInput as error:
        raise _syntax_error(error, source) from None
    compiler = _Compiler()
    node = compiler.node(tree, 0)
    if node.kind is not Kind.BOOL:
        raise RuleSyntaxError(
            f"the condition must be true or false, not a {node.kind.value}", *_position(tree)
        )
    return Compiled(_as_function(node), frozenset(compiler.variables))


def _syntax_error(error: UnexpectedInput, source: str) -> RuleSyntaxError:
    line, column = max(error.line, 1), max(error.column, 1)
    if isinstance(error, UnexpectedEOF) or (
        isinstance(error, UnexpectedToken) and error.token.type == "$END"
    ):
        lines = source.splitlines() or [""]
        return RuleSyntaxError("the condition ends too early", len(lines), len(lines[-1]) + 1)
    if isinstance(error, UnexpectedToken):
        return RuleSyntaxError(f"unexpected {error.token.value!r}", line, column)
    if isinstance(error, UnexpectedCharacters):
        return RuleSyntaxError(f"unexpected character {error.char!r}", line, column)
    return RuleSyntaxError("the condition cannot be read", line, column)


@dataclass(frozen=True, slots=True)
class _Node:
    """A compiled sub-expression: a constant (``fn`` None) or a function of the facts."""

    kind: Kind
    fn: _Fn | None = None
    value: Any = None
    variable: str | None = None  # set when the node is a bare variable


def _as_function(node: _Node) -> _Fn:
    if node.fn is not None:
        return node.fn
    value = node.value
    return lambda facts: value


def _position(tree: Tree[Token] | Token) -> tuple[int, int]:
    if isinstance(tree, Token):
        return tree.line or 1, tree.column or 1
    meta = tree.meta
    return getattr(meta, "line", 1), getattr(meta, "column", 1)


def _unquote(token: str) -> str:
    body = token[1:-1]
    out: list[str] = []
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
    i = 0
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append(escapes.get(nxt, nxt))
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


class _Compiler:
    def __init__(self) -> None:
        self.variables: set[str] = set()

    def node(self, tree: Tree[Token] | Token, depth: int) -> _Node:
        if depth > MAX_DEPTH:
            raise RuleSyntaxError("the condition is nested too deeply", *_position(tree))
        if isinstance(tree, Token):  # pragma: no cover - every token is wrapped by a rule above
            raise RuleSyntaxError(f"unexpected {tree.value!r}", *_position(tree))
        handler = getattr(self, "_" + str(tree.data).rstrip("_"), None)
        if handler is None:  # pragma: no cover - the grammar has no other rules
            raise RuleSyntaxError("the condition cannot be read", *_position(tree))
        result: _Node = handler(tree, depth + 1)
        return result

    # -- leaves -------------------------------------------------------------------------------------

    def _number(self, tree: Tree[Token], depth: int) -> _Node:
        return _Node(Kind.NUMBER, value=_number(str(tree.children[0])))

    def _neg_number(self, tree: Tree[Token], depth: int) -> _Node:
        return _Node(Kind.NUMBER, value=-_number(str(tree.children[0])))

    def _string(self, tree: Tree[Token], depth: int) -> _Node:
        return _Node(Kind.STRING, value=_unquote(str(tree.children[0])))

    def _true(self, tree: Tree[Token], depth: int) -> _Node:
        return _Node(Kind.BOOL, value=True)

    def _false(self, tree: Tree[Token], depth: int) -> _Node:
        return _Node(Kind.BOOL, value=False)

    def _name(self, tree: Tree[Token], depth: int) -> _Node:
        name = ".".join(str(part) for part in tree.children)
        known = VARIABLES.get(name)
        if known is None:
            raise RuleSyntaxError(f"unknown variable {name!r}", *_position(tree))
        self.variables.add(name)
        return _Node(known[0], fn=operator.itemgetter(name), variable=name)

    # -- operators ----------------------------------------------------------------------------------

    def _operand(self, tree: Tree[Token] | Token, depth: int, kind: Kind, what: str) -> _Node:
        node = self.node(tree, depth)
        if node.kind is not kind:
            raise RuleSyntaxError(f"{what} takes a {kind.value}, not a {node.kind.value}", *_position(tree))
        return node

    def _not(self, tree: Tree[Token], depth: int) -> _Node:
        inner = self._operand(tree.children[0], depth, Kind.BOOL, "!")
        if inner.fn is None:
            return _Node(Kind.BOOL, value=not inner.value)
        fn = inner.fn
        return _Node(Kind.BOOL, fn=lambda facts: not fn(facts))

    def _neg(self, tree: Tree[Token], depth: int) -> _Node:
        inner = self._operand(tree.children[0], depth, Kind.NUMBER, "-")
        if inner.fn is None:
            return _Node(Kind.NUMBER, value=-inner.value)
        fn = inner.fn
        return _Node(Kind.NUMBER, fn=lambda facts: -fn(facts))

    def _logic(self, tree: Tree[Token], depth: int, *, is_and: bool) -> _Node:
        what = "&&" if is_and else "||"
        left = self._operand(tree.children[0], depth, Kind.BOOL, what)
        right = self._operand(tree.children[1], depth, Kind.BOOL, what)
        if left.fn is None:  # a constant side decides or drops out
            if bool(left.value) is not is_and:
                return _Node(Kind.BOOL, value=left.value)
            return right
        if right.fn is None:
            if bool(right.value) is not is_and:
                return _Node(Kind.BOOL, value=right.value)
            return left
        a, b = left.fn, right.fn
        if is_and:
            return _Node(Kind.BOOL, fn=lambda facts: a(facts) and b(facts))
        return _Node(Kind.BOOL, fn=lambda facts: a(facts) or b(facts))

    def _and(self, tree: Tree[Token], depth: int) -> _Node:
        return self._logic(tree, depth, is_and=True)

    def _or(self, tree: Tree[Token], depth: int) -> _Node:
        return self._logic(tree, depth, is_and=False)

    def _arith(self, tree: Tree[Token], depth: int) -> _Node:
        op = operator.add if str(tree.children[1]) == "+" else operator.sub
        return self._numeric(tree.children[0], tree.children[2], depth, op, str(tree.children[1]))

    def _mul(self, tree: Tree[Token], depth: int) -> _Node:
        return self._numeric(tree.children[0], tree.children[1], depth, operator.mul, "*")

    def _numeric(
        self,
        left_tree: Tree[Token] | Token,
        right_tree: Tree[Token] | Token,
        depth: int,
        op: Callable[[Any, Any], Any],
        what: str,
    ) -> _Node:
        left = self._operand(left_tree, depth, Kind.NUMBER, what)
        right = self._operand(right_tree, depth, Kind.NUMBER, what)
        if left.fn is None and right.fn is None:
            return _Node(Kind.NUMBER, value=op(left.value, right.value))
        a, b = _as_function(left), _as_function(right)
        return _Node(Kind.NUMBER, fn=lambda facts: op(a(facts), b(facts)))

    def _compare(self, tree: Tree[Token], depth: int) -> _Node:
        symbol = str(tree.children[1])
        left = self.node(tree.children[0], depth)
        right = self.node(tree.children[2], depth)
        if left.kind is not right.kind:
            raise RuleSyntaxError(
                f"{symbol} compares a {left.kind.value} with a {right.kind.value}",
                *_position(tree.children[1]),
            )
        if left.kind is Kind.BOOL and symbol not in ("==", "!="):
            raise RuleSyntaxError(f"{symbol} does not order true and false", *_position(tree.children[1]))
        op = _COMPARE[symbol]
        if left.fn is None and right.fn is None:
            return _Node(Kind.BOOL, value=op(left.value, right.value))
        # The common shapes get one closure each: a variable against a constant, either way round.
        if left.variable is not None and right.fn is None:
            name, constant = left.variable, right.value
            return _Node(Kind.BOOL, fn=lambda facts: op(facts[name], constant))
        if right.variable is not None and left.fn is None:
            name, constant = right.variable, left.value
            return _Node(Kind.BOOL, fn=lambda facts: op(constant, facts[name]))
        a, b = _as_function(left), _as_function(right)
        return _Node(Kind.BOOL, fn=lambda facts: op(a(facts), b(facts)))

    def _in(self, tree: Tree[Token], depth: int) -> _Node:
        needle = self.node(tree.children[0], depth)
        listed = tree.children[1]
        children = listed.children if isinstance(listed, Tree) else []
        items = [self.node(child, depth) for child in children]
        for child, item in zip(children, items, strict=True):
            if item.kind is not needle.kind:
                raise RuleSyntaxError(
                    f"in looks for a {needle.kind.value} in a list holding a {item.kind.value}",
                    *_position(child),
                )
        values = frozenset(item.value for item in items)
        if needle.fn is None:
            return _Node(Kind.BOOL, value=needle.value in values)
        if needle.variable is not None:
            name = needle.variable
            return _Node(Kind.BOOL, fn=lambda facts: facts[name] in values)
        fn = needle.fn
        return _Node(Kind.BOOL, fn=lambda facts: fn(facts) in values)
