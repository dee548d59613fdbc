"""The Cypher console's text check: reads a query the way the Cypher parser does and refuses what a reader must not run.

What it does: `tokenize` splits a query into Cypher tokens (names, back-quoted names with their `` `` `` escapes,
strings, numbers, parameters, punctuation), dropping whitespace and comments, so that a name is compared the way the
server resolves it: `` `db` . /* x */ `stats`.collect `` is the procedure `db.stats.collect`. `check_read_only`
then refuses, with a reason for the user:

- more than one statement, and the `EXPLAIN`, `PROFILE` and `CYPHER …` prefixes (the runner plans the query itself);
- `\\uXXXX` escapes anywhere (Neo4j 5.26 decodes them before it parses, even inside strings, so `'\\u0027'` ends a
  string: a text check that does not decode them could be fooled);
- write and administration clauses (CREATE, INSERT, MERGE, DELETE, SET, REMOVE, DROP, FOREACH, LOAD CSV, USE,
  GRANT, TERMINATE, …), `CALL { … } IN TRANSACTIONS`;
- `SHOW` except `SHOW INDEXES`, `SHOW CONSTRAINTS`, `SHOW FUNCTIONS` and `SHOW PROCEDURES` (the schema and the
  callable API, which a reader needs to write queries). SHOW SETTINGS (server configuration), SHOW TRANSACTIONS
  (other sessions' queries and parameters), SHOW USERS/ROLES/PRIVILEGES/DATABASES/SERVERS/ALIASES and the rest are
  refused;
- a procedure outside a read-only allow-list (so `dbms.*`, `db.stats.*` query collection, `tx.setMetaData`,
  `db.clearQueryCaches`, APOC's writers and `apoc.cypher.*`), wherever the `CALL` stands, subqueries included;
- a namespaced function outside an allow-list of pure ones (temporal, spatial, vector, APOC's pure helpers), so
  that `apoc.cypher.runFirstColumn…` and other functions that run text as Cypher or read the server are refused.

What it must not do: reach a server, or accept anything it does not understand. This is the first of three layers
(the server's EXPLAIN classification and a READ transaction follow, see `app.cypher`); it errs on the side of
refusing. It imports no Streamlit and no driver.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Clauses and commands that write data or schema, or administer the server.
WRITE_KEYWORDS: frozenset[str] = frozenset(
    {
        "CREATE",
        "INSERT",
        "MERGE",
        "DELETE",
        "DETACH",
        "SET",
        "REMOVE",
        "DROP",
        "FOREACH",
        "ALTER",
        "RENAME",
        "GRANT",
        "DENY",
        "REVOKE",
        "START",
        "STOP",
        "TERMINATE",
        "ENABLE",
        "SUSPEND",
        "DEALLOCATE",
        "REALLOCATE",
        "DRYRUN",
        "USE",
    }
)
# Statement prefixes the runner adds itself (EXPLAIN) or that change how the server runs the query.
PREFIXES: frozenset[str] = frozenset({"EXPLAIN", "PROFILE", "CYPHER"})

# `SHOW …` forms a reader may run: the first word after SHOW (and its optional type words) must be one of these.
SHOW_ALLOWED: frozenset[str] = frozenset({"INDEX", "INDEXES", "CONSTRAINT", "CONSTRAINTS", "FUNCTION", "FUNCTIONS"})
SHOW_ALLOWED |= {"PROCEDURE", "PROCEDURES"}
# Words that may stand between SHOW and the allowed noun (`SHOW RANGE INDEXES`, `SHOW BUILT IN FUNCTIONS`).
SHOW_MODIFIERS: frozenset[str] = frozenset(
    {"ALL", "RANGE", "TEXT", "POINT", "LOOKUP", "FULLTEXT", "VECTOR", "BTREE", "UNIQUE", "UNIQUENESS", "KEY"}
    | {"NODE", "RELATIONSHIP", "REL", "EXIST", "EXISTENCE", "PROPERTY", "EXISTS", "TYPE", "BUILT", "IN", "USER"}
    | {"DEFINED"}
)

# Procedures (lower-case, exact names or prefixes ending in ".") that only read the graph or its schema.
READ_ONLY_PROCEDURES: tuple[str, ...] = (
    "db.labels",
    "db.relationshiptypes",
    "db.propertykeys",
    "db.schema.",
    "db.info",
    "db.ping",
    "db.indexes",
    "db.constraints",
    "db.index.fulltext.querynodes",
    "db.index.fulltext.queryrelationships",
    "db.index.vector.querynodes",
    "db.index.vector.queryrelationships",
    "apoc.meta.",
    "apoc.path.",
    "apoc.coll.",
    "apoc.text.",
    "apoc.map.",
    "apoc.math.",
    "apoc.algo.",
    "apoc.neighbors.",
    "apoc.nodes.get",
)
# (Not `apoc.convert.*` or `apoc.date.*`: among their procedures are writers such as `apoc.convert.setJsonProperty`.)
# Namespaced functions (lower-case, exact or prefixes ending in ".") that compute from their arguments only.
# Functions without a namespace are Cypher's built-ins and are all allowed.
PURE_FUNCTIONS: tuple[str, ...] = (
    "date.",
    "datetime.",
    "localdatetime.",
    "localtime.",
    "time.",
    "duration.",
    "point.",
    "vector.",
    "apoc.coll.",
    "apoc.text.",
    "apoc.map.",
    "apoc.math.",
    "apoc.agg.",
    "apoc.convert.",
    "apoc.date.",
    "apoc.node.",
    "apoc.label.",
    "apoc.meta.",
)


class CypherRejected(ValueError):
    """The console refused a query before running it; the message says why, for the user."""


@dataclass(frozen=True)
class Token:
    """One Cypher token. `kind`: name (unquoted), qname (back-quoted), string, number, param, punct."""

    kind: str
    text: str  # the name without back-quotes (escapes resolved), the literal as written, or the punctuation
    offset: int

    @property
    def word(self) -> str | None:
        """The keyword this token can be (upper case), or None: only unquoted names are keywords."""
        return self.text.upper() if self.kind == "name" else None

    @property
    def is_name(self) -> bool:
        return self.kind in ("name", "qname")


_NAME = re.compile(r"[^\W\d]\w*", re.UNICODE)
_NUMBER = re.compile(r"\d[\w]*(?:\.\d\w*)?", re.UNICODE)
_SPACE = re.compile(r"\s+", re.UNICODE)


def _quoted_end(text: str, start: int, quote: str) -> int:
    """Index just past the closing `quote` of the literal opened at `start`; raises on an unterminated one."""
    i, n = start + 1, len(text)
    while i < n:
        ch = text[i]
        if quote == "`":
            if ch == "`":
                if text.startswith("``", i):  # an escaped back-quote inside the name
                    i += 2
                    continue
                return i + 1
        elif ch == "\\":
            i += 2
            continue
        elif ch == quote:
            return i + 1
        i += 1
    what = "back-quoted name" if quote == "`" else "string"
    raise CypherRejected(f"unterminated {what} starting at offset {start}")


def tokenize(text: str) -> list[Token]:
    """Cypher tokens of `text`, without whitespace and comments; raises `CypherRejected` on unterminated literals."""
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        space = _SPACE.match(text, i)
        if space:
            i = space.end()
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise CypherRejected(f"unterminated comment starting at offset {i}")
            i = j + 2
        elif ch in "'\"":
            j = _quoted_end(text, i, ch)
            tokens.append(Token("string", text[i:j], i))
            i = j
        elif ch == "`":
            j = _quoted_end(text, i, ch)
            tokens.append(Token("qname", text[i + 1 : j - 1].replace("``", "`"), i))
            i = j
        elif ch == "$":
            j = i + 1
            if j < n and text[j] == "`":
                j = _quoted_end(text, j, "`")
            else:
                match = _NAME.match(text, j) or _NUMBER.match(text, j)
                j = match.end() if match else j
            tokens.append(Token("param", text[i:j], i))
            i = j
        elif (match := _NAME.match(text, i)) is not None:
            tokens.append(Token("name", match.group(), i))
            i = match.end()
        elif (match := _NUMBER.match(text, i)) is not None:
            tokens.append(Token("number", match.group(), i))
            i = match.end()
        else:
            tokens.append(Token("punct", ch, i))
            i += 1
    return tokens


def qualified_name(tokens: list[Token], start: int) -> tuple[str, int]:
    """The dotted name that starts at `tokens[start]` (parts joined by '.', back-quotes resolved) and the index after
    it. Whitespace and comments between the parts are already gone, as they are for the Cypher parser."""
    parts = [tokens[start].text]
    i = start + 1
    while i + 1 < len(tokens) and tokens[i].text == "." and tokens[i].kind == "punct" and tokens[i + 1].is_name:
        parts.append(tokens[i + 1].text)
        i += 2
    return ".".join(parts), i


def _allowed(name: str, allow: tuple[str, ...]) -> bool:
    lowered = name.lower()
    return any(lowered == p or (p.endswith(".") and lowered.startswith(p)) for p in allow)


def _is_keyword_position(tokens: list[Token], i: int) -> bool:
    """Whether the unquoted name at `i` stands where a keyword can: not a property (`n.set`), label or type
    (`:Create`), parameter, or map key (`{delete: 1}`)."""
    prev = tokens[i - 1].text if i > 0 and tokens[i - 1].kind == "punct" else ""
    nxt = tokens[i + 1].text if i + 1 < len(tokens) and tokens[i + 1].kind == "punct" else ""
    return prev not in (".", ":") and nxt != ":"


def _check_show(tokens: list[Token], i: int) -> None:
    words: list[str] = []
    j = i + 1
    while j < len(tokens) and tokens[j].kind == "name":
        words.append(tokens[j].text.upper())
        if words[-1] not in SHOW_MODIFIERS:
            break
        j += 1
    noun = words[-1] if words else ""
    if noun not in SHOW_ALLOWED:
        shown = " ".join(words) or "…"
        raise CypherRejected(
            f"SHOW {shown} is not allowed: the console shows only INDEXES, CONSTRAINTS, FUNCTIONS and PROCEDURES "
            "(settings, transactions, users, databases and servers are the server administrator's business)"
        )


def _check_procedure(name: str) -> None:
    if name.lower().startswith("dbms."):
        raise CypherRejected(f"CALL {name} is not allowed: dbms procedures administer the server")
    if not _allowed(name, READ_ONLY_PROCEDURES):
        examples = ", ".join(p.rstrip(".") + (".*" if p.endswith(".") else "") for p in READ_ONLY_PROCEDURES[:6])
        raise CypherRejected(f"CALL {name} is not allowed: the console only calls read-only procedures ({examples}, …)")


def _check_function(name: str) -> None:
    if not _allowed(name, PURE_FUNCTIONS):
        raise CypherRejected(
            f"the function {name}() is not allowed: the console calls Cypher's built-in functions and namespaced "
            "ones that only compute (date.*, duration.*, point.*, vector.*, apoc.coll.*, apoc.text.*, …)"
        )


def _check_word(tokens: list[Token], i: int) -> None:
    word = tokens[i].word
    nxt = tokens[i + 1].word if i + 1 < len(tokens) else None
    if word == "LOAD" and nxt == "CSV":
        raise CypherRejected("LOAD CSV is not allowed: the console is read-only and reads only the graph store")
    prev = tokens[i - 1] if i > 0 else None
    batched = prev is not None and (prev.word in ("IN", "CONCURRENT") or prev.kind in ("number", "param"))
    if (word in ("TRANSACTIONS", "TRANSACTION") and batched) or (word == "PERIODIC" and nxt == "COMMIT"):
        raise CypherRejected("CALL { … } IN TRANSACTIONS is not allowed: the console runs one read transaction")
    if word == "SHOW":
        _check_show(tokens, i)
    if word in WRITE_KEYWORDS:
        raise CypherRejected(
            f"{word} is not allowed: the console is read-only (no CREATE, INSERT, MERGE, DELETE, SET, REMOVE, DROP, "
            "LOAD CSV or administration commands)"
        )


def check_tokens(tokens: list[Token]) -> None:
    """Raise `CypherRejected` for the first thing in `tokens` the console does not run (see the module docstring)."""
    if not tokens:
        raise CypherRejected("the query is empty")
    if tokens[0].word in PREFIXES:
        raise CypherRejected(
            f"{tokens[0].word} is not allowed: the console plans and runs the query itself (remove the prefix)"
        )
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.kind == "punct" and token.text == ";":
            raise CypherRejected("only one statement at a time: remove the ';' between statements")
        keyword = token.kind == "name" and _is_keyword_position(tokens, i)
        if keyword and token.word == "CALL" and i + 1 < len(tokens) and tokens[i + 1].is_name:
            name, i = qualified_name(tokens, i + 1)
            _check_procedure(name)
            continue
        # A dotted name followed by '(' is a function call, wherever it stands (a map value after ':' included);
        # only a name after '.' continues a property chain instead.
        after_dot = i > 0 and tokens[i - 1].kind == "punct" and tokens[i - 1].text == "."
        if token.is_name and not after_dot:
            name, end = qualified_name(tokens, i)
            if "." in name and end < len(tokens) and tokens[end].text == "(" and tokens[end].kind == "punct":
                _check_function(name)
                i = end
                continue
        if keyword:
            _check_word(tokens, i)
        i += 1


def check_read_only(text: str) -> str:
    """Return the query stripped of surrounding whitespace and trailing `;`, or raise `CypherRejected` with a reason."""
    query = text.strip()
    while query.endswith(";"):
        query = query[:-1].rstrip()
    if not query:
        raise CypherRejected("the query is empty")
    if re.search(r"\\u", query, re.IGNORECASE):
        raise CypherRejected(
            "unicode escapes (\\uXXXX) are not allowed in the console, not even in strings: type the character"
        )
    check_tokens(tokenize(query))
    return query


def strip_literals(text: str) -> str:
    """`text` with comments removed and string literals and back-quoted names blanked (same length where kept).

    What remains is what the Cypher parser reads as keywords and identifiers. Kept for callers that want a quick
    look at the code part; the guard itself works on `tokenize`.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "'\"`":
            try:
                j = _quoted_end(text, i, ch)
            except CypherRejected:
                j = n
            out.append(" " * (j - i))
            i = j
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            out.append(" ")
            i = n if j < 0 else j + 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)
