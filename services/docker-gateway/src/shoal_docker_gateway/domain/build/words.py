"""Dockerfile words: quotes, the escape character and `$VAR`, `${VAR}`, `${VAR:-word}`,
`${VAR:+word}` substitution, as the classic builder applies them to the arguments of ADD,
COPY, ENV, EXPOSE, FROM, LABEL, STOPSIGNAL, USER, VOLUME and WORKDIR (never to RUN, CMD
or ENTRYPOINT: their shell does it)."""

from __future__ import annotations

from collections.abc import Mapping

from shoal_docker_gateway.domain.build.errors import BuildError

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str) -> None:
        self.text, self.env, self.escape = text, env, escape
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self) -> str:
        c = self.peek()
        self.pos += 1
        return c

    def words(self, split: bool, stop: str = "") -> list[str]:
        """The words up to the end (or an unquoted `stop`), split on unquoted whitespace
        when `split`; quotes and escapes removed, variables substituted."""
        words: list[str] = []
        cur: list[str] = []
        started = False
        while self.pos < len(self.text):
            c = self.peek()
            if stop and c == stop:
                break
            if split and c.isspace():
                self.pos += 1
                if started:
                    words.append("".join(cur))
                    cur, started = [], False
                continue
            started = True
            cur.append(self.piece())
        if started or not split:
            words.append("".join(cur))
        return words

    def piece(self) -> str:
        """The text one unit stands for: an escaped character, a quoted string, a variable,
        or a plain character."""
        c = self.take()
        if c == self.escape:
            return self.take() or c
        if c == "'":
            return self.single_quoted()
        if c == '"':
            return self.double_quoted()
        if c == "$":
            return self.dollar()
        return c

    def single_quoted(self) -> str:
        end = self.text.find("'", self.pos)
        if end < 0:
            raise BuildError(f"unexpected end of statement while looking for matching single-"
                             f"quote in {self.text!r}")
        out, self.pos = self.text[self.pos:end], end + 1
        return out

    def double_quoted(self) -> str:
        out: list[str] = []
        while True:
            c = self.take()
            if not c:
                raise BuildError(f"unexpected end of statement while looking for matching "
                                 f"double-quote in {self.text!r}")
            if c == '"':
                return "".join(out)
            if c == self.escape and self.peek() in ('"', "$", self.escape):
                out.append(self.take())
            elif c == "$":
                out.append(self.dollar())
            else:
                out.append(c)

    def dollar(self) -> str:
        if self.peek() == "{":
            self.pos += 1
            return self.braced()
        start = self.pos
        while self.peek() and self.peek() in _NAME_CHARS:
            self.pos += 1
        name = self.text[start:self.pos]
        if not name:
            return "$"
        return self.env.get(name, "")

    def braced(self) -> str:
        start = self.pos
        while self.peek() and self.peek() in _NAME_CHARS:
            self.pos += 1
        name = self.text[start:self.pos]
        if not name:
            raise BuildError(f"missing variable name in ${{...}} in {self.text!r}")
        if self.peek() == "}":
            self.pos += 1
            return self.env.get(name, "")
        if self.peek() != ":":
            raise BuildError(f"unsupported modifier {self.peek()!r} in ${{{name}...}} in "
                             f"{self.text!r}")
        self.pos += 1
        modifier = self.take()
        if modifier not in ("-", "+"):
            raise BuildError(f"unsupported modifier ':{modifier}' in ${{{name}...}} in "
                             f"{self.text!r}")
        word = "".join(self.words(split=False, stop="}"))
        if self.take() != "}":
            raise BuildError(f"missing '}}' in {self.text!r}")
        value = self.env.get(name, "")
        if modifier == "-":
            return value or word
        return word if value else ""


def expand(text: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """One word: quotes and escapes removed, variables substituted, spaces kept."""
    return _Lexer(text, env, escape).words(split=False)[0]


def expand_words(text: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """The words of `text` (split on unquoted whitespace), each expanded."""
    return _Lexer(text, env, escape).words(split=True)


def raw_words(text: str, escape: str = "\\") -> list[str]:
    """`text` split on unquoted whitespace, quotes and escapes kept (ENV, LABEL and ARG
    split each word at its first `=` before expanding key and value)."""
    words: list[str] = []
    cur: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if c == escape and i + 1 < len(text) and quote != "'":
            cur.append(text[i:i + 2])
            i += 2
            continue
        if quote:
            quote = "" if c == quote else quote
        elif c in ("'", '"'):
            quote = c
        elif c.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    if cur:
        words.append("".join(cur))
    return words
