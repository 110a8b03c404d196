"""Row predicates over crawled columns, such as `punsafe < 0.1 and WIDTH >= 256`, as Arrow compute expressions.

The `metadata` curate rule keeps rows by predicates a job writes as text. The text is never handed to `eval` or
to Python's parser: a small tokenizer and a recursive-descent parser accept exactly this grammar (keywords in any
case), and everything else is a `PredicateError` naming the predicate, the position and what was expected.

    predicate  := or
    or         := and ("or" and)*
    and        := unary ("and" unary)*
    unary      := "not" unary | "(" predicate ")" | test
    test       := column op literal | literal op column | column "is" ["not"] "null"
                | column ["not"] "in" "[" literal ("," literal)* [","] "]"
    op         := "<" | "<=" | ">" | ">=" | "==" | "=" | "!="
    column     := identifier (letters, digits, _) | "double-quoted name" ("" inside is one ")
    literal    := number (-1, 0.5, 1e-3) | 'single-quoted string' ('' inside is one ') | true | false

Nulls follow SQL: a comparison or `in` with a null value is neither true nor false but unknown, `not unknown`
is unknown, `unknown and false` is false and `unknown or true` is true; a row is kept only where the whole
predicate is true. So `punsafe < 0.1` and `not punsafe >= 0.1` both drop a row whose punsafe is null; say
`punsafe < 0.1 or punsafe is null` to keep it. NaN is a value, not null: every comparison with it is false but
`!=`, as in IEEE arithmetic and pandas.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    import numpy as np

KEYWORDS = frozenset({"and", "or", "not", "in", "is", "null", "true", "false"})
OPS = ("<=", ">=", "==", "!=", "<", ">", "=")
FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
MAX_DEPTH = 64  # nested parentheses and nots: deeper text is refused, not a RecursionError
INT64 = 1 << 63

Literal = bool | int | float | str


class PredicateError(ValueError):
    """A predicate that does not parse, or that does not fit the table it is evaluated on."""

    def __init__(self, text: str, message: str, position: int | None = None) -> None:
        self.text = text
        self.position = position  # 1-based character position, None for errors about the whole predicate
        self.reason = message
        where = f", position {position}" if position is not None else ""
        super().__init__(f"predicate {text!r}{where}: {message}")


# ---- tokens --------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[^\W\d]\w*")


@dataclass(frozen=True)
class Token:
    kind: str  # ident keyword column string number op ( ) [ ] , end
    value: Literal
    pos: int  # 0-based offset into the text
    lexeme: str

    def describe(self) -> str:
        return "end of text" if self.kind == "end" else repr(self.lexeme)


def _quoted(text: str, start: int, quote: str) -> tuple[str, int]:
    """The content of a quoted token starting at `start` (a doubled quote is one), and the offset after it."""
    out, i = [], start + 1
    while True:
        j = text.find(quote, i)
        if j < 0:
            what = "column name" if quote == '"' else "string"
            raise PredicateError(text, f"unterminated {what}: expected a closing {quote}", start + 1)
        out.append(text[i:j])
        if text.startswith(quote * 2, j):
            out.append(quote)
            i = j + 2
            continue
        return "".join(out), j + 1


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c in "'\"":
            content, end = _quoted(text, i, c)
            tokens.append(Token("string" if c == "'" else "column", content, i, text[i:end]))
            i = end
            continue
        if c in "()[],":
            tokens.append(Token(c, c, i, c))
            i += 1
            continue
        op = next((o for o in OPS if text.startswith(o, i)), None)
        if op is not None:
            tokens.append(Token("op", "==" if op == "=" else op, i, op))
            i += len(op)
            continue
        m = _NUMBER.match(text, i)
        if m and not _IDENT.match(text, m.end()):
            lexeme = m.group()
            value: int | float
            if re.fullmatch(r"-?\d+", lexeme):
                value = int(lexeme)
                if not -INT64 <= value < INT64:
                    raise PredicateError(text, f"the integer {lexeme} is out of the 64-bit range", i + 1)
            else:
                value = float(lexeme)
            tokens.append(Token("number", value, i, lexeme))
            i = m.end()
            continue
        m = _IDENT.match(text, i)
        if m:
            word = m.group()
            kind = "keyword" if word.lower() in KEYWORDS else "ident"
            tokens.append(Token(kind, word.lower() if kind == "keyword" else word, i, word))
            i = m.end()
            continue
        raise PredicateError(text, f"unexpected character {c!r}: expected a column name, a literal, an operator "
                                   f"(< <= > >= == !=), a parenthesis or a bracket (a column name with other "
                                   f"characters is written in double quotes)", i + 1)
    tokens.append(Token("end", "", n, ""))
    return tokens


# ---- the tree ------------------------------------------------------------------------------------------------

PREC_OR, PREC_AND, PREC_NOT, PREC_TEST = 1, 2, 3, 4


def render_column(name: str) -> str:
    if _IDENT.fullmatch(name) and name.lower() not in KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


def render_literal(value: Literal) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def _kind(value: Literal) -> str:
    return "bool" if isinstance(value, bool) else "string" if isinstance(value, str) else "number"


def _type_kind(t: pa.DataType) -> str | None:
    """What literals a column of type t compares with; None for a type that compares with anything (all null)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_null(t):
        return None
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    return "other"


class Node:
    prec: int

    def expression(self) -> pc.Expression:
        raise NotImplementedError

    def render(self) -> str:
        raise NotImplementedError

    def columns(self) -> list[str]:
        raise NotImplementedError

    def check(self, schema: pa.Schema, text: str) -> None:
        """Raise PredicateError where a column is missing or compared with a literal of another kind."""

    def wrap(self, parent: int) -> str:
        return f"({self.render()})" if self.prec < parent else self.render()


@dataclass
class Test(Node):
    """A comparison, `in` list or null test on one column."""

    column: str
    op: str  # a comparison operator, "in", "not in", "is null", "is not null"
    values: tuple[Literal, ...] = ()
    prec = PREC_TEST

    def expression(self) -> pc.Expression:
        f = pc.field(self.column)
        if self.op == "is null":
            return f.is_null()
        if self.op == "is not null":
            return f.is_valid()
        if self.op in ("in", "not in"):
            found = f.isin(pa.array(self.values))
            # unknown (null) for a null value, as a comparison is, so that `not in` and `not (x in ...)` drop it
            found = pc.if_else(f.is_valid(), found, pa.scalar(None, pa.bool_()))
            return ~found if self.op == "not in" else found
        lit = pc.scalar(self.values[0])
        return {"<": f < lit, "<=": f <= lit, ">": f > lit, ">=": f >= lit, "==": f == lit, "!=": f != lit}[self.op]

    def render(self) -> str:
        col = render_column(self.column)
        if self.op.startswith("is"):
            return f"{col} {self.op}"
        if self.op.endswith("in"):
            return f"{col} {self.op} [{', '.join(render_literal(v) for v in self.values)}]"
        return f"{col} {self.op} {render_literal(self.values[0])}"

    def columns(self) -> list[str]:
        return [self.column]

    def check(self, schema: pa.Schema, text: str) -> None:
        if self.column not in schema.names:
            raise PredicateError(text, f"no column {self.column!r}; the table has {', '.join(schema.names)}")
        if not self.values:
            return
        t = schema.field(self.column).type
        have, want = _type_kind(t), _kind(self.values[0])
        if have is not None and have != want:
            raise PredicateError(text, f"column {self.column!r} is {t}, which does not compare with a {want} "
                                       f"({self.render()})")


@dataclass
class Not(Node):
    item: Node
    prec = PREC_NOT

    def expression(self) -> pc.Expression:
        return ~self.item.expression()

    def render(self) -> str:
        return f"not {self.item.wrap(PREC_NOT)}"

    def columns(self) -> list[str]:
        return self.item.columns()

    def check(self, schema: pa.Schema, text: str) -> None:
        self.item.check(schema, text)


@dataclass
class Join(Node):
    """`and` or `or` of two or more items (Kleene logic: unknown and false is false, unknown or true is true)."""

    word: str
    items: list[Node]

    @property
    def prec(self) -> int:  # type: ignore[override]
        return PREC_AND if self.word == "and" else PREC_OR

    def expression(self) -> pc.Expression:
        out = self.items[0].expression()
        for item in self.items[1:]:
            out = (out & item.expression()) if self.word == "and" else (out | item.expression())
        return out

    def render(self) -> str:
        # an item of the same precedence is parenthesised: the parser left it apart, so the text keeps it apart
        return f" {self.word} ".join(item.wrap(self.prec + 1) for item in self.items)

    def columns(self) -> list[str]:
        return [c for item in self.items for c in item.columns()]

    def check(self, schema: pa.Schema, text: str) -> None:
        for item in self.items:
            item.check(schema, text)


# ---- the parser ----------------------------------------------------------------------------------------------

LITERAL = "a number, a 'string' literal, true or false"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def fail(self, expected: str, tok: Token | None = None, hint: str = "") -> PredicateError:
        tok = tok or self.tok
        return PredicateError(self.text, f"expected {expected}, got {tok.describe()}{hint}", tok.pos + 1)

    def keyword(self, *words: str) -> bool:
        if self.tok.kind == "keyword" and self.tok.value in words:
            self.i += 1
            return True
        return False

    def parse(self) -> Node:
        node = self.disjunction()
        if self.tok.kind != "end":
            raise self.fail("'and', 'or' or the end of the predicate")
        return node

    def disjunction(self) -> Node:
        items = [self.conjunction()]
        while self.keyword("or"):
            items.append(self.conjunction())
        return items[0] if len(items) == 1 else Join("or", items)

    def conjunction(self) -> Node:
        items = [self.unary()]
        while self.keyword("and"):
            items.append(self.unary())
        return items[0] if len(items) == 1 else Join("and", items)

    def unary(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise PredicateError(self.text, f"nested deeper than {MAX_DEPTH} parentheses or nots", self.tok.pos + 1)
        try:
            if self.keyword("not"):
                return Not(self.unary())
            if self.tok.kind == "(":
                self.i += 1
                node = self.disjunction()
                if self.tok.kind != ")":
                    raise self.fail("')', 'and' or 'or'")
                self.i += 1
                return node
            return self.test()
        finally:
            self.depth -= 1

    def column(self) -> str | None:
        if self.tok.kind in ("ident", "column"):
            name = str(self.tok.value)
            if self.tok.kind == "column" and not name:
                raise PredicateError(self.text, 'an empty column name ""', self.tok.pos + 1)
            self.i += 1
            return name
        return None

    def literal(self, after: Token | None = None) -> Literal:
        tok = self.tok
        if tok.kind in ("number", "string") or (tok.kind == "keyword" and tok.value in ("true", "false")):
            self.i += 1
            return tok.value if tok.kind != "keyword" else tok.value == "true"
        what = f"{LITERAL} after {after.describe()}" if after else LITERAL
        if tok.kind == "column":
            raise self.fail(what, hint=" (a double-quoted name is a column; a string literal takes single quotes)")
        if tok.kind == "keyword" and tok.value == "null":
            raise self.fail(what, hint=" (test for null with `is null` or `is not null`)")
        raise self.fail(what)

    def test(self) -> Node:
        start = self.tok
        name = self.column()
        if name is None:
            if start.kind in ("number", "string") or (start.kind == "keyword" and start.value in ("true", "false")):
                return self.reversed_comparison()
            if start.kind == "end" and self.i == 0:
                raise self.fail("a column name, 'not' or '('", hint=" (the predicate is empty)")
            raise self.fail("a column name, 'not' or '('",
                            hint=" (a column named like a keyword is written in double quotes)"
                            if start.kind == "keyword" else "")
        tok = self.tok
        if tok.kind == "op":
            self.i += 1
            return self.comparison(name, str(tok.value), tok)
        if self.keyword("is"):
            negated = self.keyword("not")
            if not self.keyword("null"):
                raise self.fail("'null'" if negated else "'null' or 'not null'")
            return Test(name, "is not null" if negated else "is null")
        negated = self.keyword("not")
        if self.keyword("in"):
            return Test(name, "not in" if negated else "in", self.items())
        if negated:
            raise self.fail("'in' after 'not'")
        hint = " (a column name with spaces is written in double quotes)" if tok.kind in ("ident", "column") else ""
        raise self.fail(f"a comparison (< <= > >= == !=), 'in', 'not in' or 'is' after the column {start.describe()}",
                        hint=hint)

    def comparison(self, name: str, op: str, tok: Token) -> Test:
        at = self.tok
        value = self.literal(tok)
        if isinstance(value, bool) and op not in ("==", "!="):
            raise PredicateError(self.text, f"true and false compare only with == or !=, not {op}", at.pos + 1)
        return Test(name, op, (value,))

    def reversed_comparison(self) -> Test:
        at = self.tok
        value = self.literal()
        tok = self.tok
        if tok.kind != "op":
            raise self.fail(f"a comparison (< <= > >= == !=) after the literal {at.describe()}")
        self.i += 1
        name = self.column()
        if name is None:
            raise self.fail(f"a column name after {tok.describe()} (a comparison is between a column and a literal)")
        op = FLIP[str(tok.value)]
        if isinstance(value, bool) and op not in ("==", "!="):
            raise PredicateError(self.text, f"true and false compare only with == or !=, not {tok.value}", at.pos + 1)
        return Test(name, op, (value,))

    def items(self) -> tuple[Literal, ...]:
        if self.tok.kind != "[":
            raise self.fail("'[' starting the list of values")
        self.i += 1
        values: list[Literal] = []
        first: Token | None = None
        while True:
            if self.tok.kind == "]" and values:
                self.i += 1
                break
            at = self.tok
            if at.kind == "]":
                raise self.fail(LITERAL, hint=" (a list needs at least one value)")
            values.append(self.literal())
            first = first or at
            if _kind(values[-1]) != _kind(values[0]):
                raise PredicateError(self.text, f"the list mixes a {_kind(values[0])} ({first.lexeme}) with a "
                                                f"{_kind(values[-1])} ({at.lexeme}); give values of one kind",
                                     at.pos + 1)
            if self.tok.kind == ",":
                self.i += 1
                continue
            if self.tok.kind == "]":
                self.i += 1
                break
            raise self.fail("',' or ']' in the list of values")
        return tuple(values)


# ---- the public surface --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Predicate:
    """A parsed predicate: its normalised text, the Arrow expression, and the columns it reads (first use order)."""

    text: str
    columns: tuple[str, ...]
    source: str  # the text as written
    tree: Node

    @functools.cached_property
    def expression(self) -> pc.Expression:
        # built on first use: an Arrow scalar imports pandas, which validating a job must not
        return self.tree.expression()

    def check(self, schema: pa.Schema) -> None:
        """Raise PredicateError if a column is missing from `schema` or is compared with a literal of another kind."""
        self.tree.check(schema, self.source)

    def evaluate(self, table: pa.Table) -> pa.ChunkedArray:
        """The predicate's value per row of `table`: true, false or null (unknown)."""
        import pyarrow.dataset as ds

        self.check(table.schema)
        table = table.select(list(self.columns))
        for i, f in enumerate(table.schema):
            if pa.types.is_decimal(f.type):  # compared as doubles: an integer literal is a decimal too wide to cast
                table = table.set_column(i, f.name, table.column(i).cast(pa.float64()))
        try:
            out = ds.dataset(table).to_table(columns={"keep": self.expression})
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise PredicateError(self.source, f"cannot evaluate it on this table: {exc}") from None
        return out.column("keep")

    def mask(self, table: pa.Table) -> np.ndarray:
        """A numpy bool array: True for the rows the predicate keeps (where it is true; null counts as not kept)."""
        import numpy as np

        keep = pc.fill_null(self.evaluate(table), False)
        return np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)


def parse(text: str) -> Predicate:
    """Parse `text` (see the module doc), or raise PredicateError naming the position and what was expected."""
    if not isinstance(text, str):
        raise PredicateError(str(text), f"expected text, got {type(text).__name__}")
    tree = _Parser(text).parse()
    return Predicate(text=tree.render(), columns=tuple(dict.fromkeys(tree.columns())), source=text, tree=tree)


def mask(text: str | Predicate, table: pa.Table) -> np.ndarray:
    """Rows of `table` that every part of the predicate keeps: `parse(text).mask(table)`."""
    return (parse(text) if isinstance(text, str) else text).mask(table)
