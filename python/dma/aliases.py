"""/etc/aliases in C dma's format, and expansion of local recipients through it.

The grammar is C dma's (``aliases_scan.l``/``aliases_parse.y``)::

    name: destination, destination, ...

* ``#`` starts a comment (outside double quotes) that runs to the end of the line;
  blank and comment-only lines are ignored;
* a line that starts with a space or a tab continues the entry before it, and so does a
  line that follows one ending in a backslash;
* destinations are separated by commas (``name: a b`` is an error, as in C dma);
* ``*`` is the catch-all: it applies to a top-level local recipient that has no alias of
  its own (command line, ``-t`` headers, bounces), never during nested expansion.

Kinder than C dma, so that the /etc/aliases files distributions ship keep working:

* a destination may be a double-quoted string (``"|/usr/bin/prog -x"``), whose quotes
  are removed;
* ``|program``, ``/file`` and ``:include:/file`` destinations are accepted when the file
  is read, but dma does not deliver to them: a message addressed to an alias that
  reaches one is refused (DataError naming the alias) when it is submitted;
* ``\\user`` (sendmail) is the local user ``user``, not expanded further;
* names are looked up case-insensitively (as sendmail and Postfix do; C dma compares
  with ``strcmp``), and entries that repeat a name are merged in file order (C dma
  also expands every entry of a repeated name);
* a name that turns up again on its own expansion path is a final local user
  (sendmail's rule, so ``root: root, admin@example.org`` keeps a local copy), where C
  dma silently dropped it.

Whether a local user exists is not checked here: ``submit`` does that.
"""

from __future__ import annotations

from dma.address import parse_mailbox, quote_local
from dma.errors import AddressError, ConfigError, DataError
from dma.record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

DEFAULT_PATH = "/etc/aliases"
MAX_DEPTH = 32
"""Deepest nesting of aliases that expand() follows."""
MAX_STEPS = 10000
"""Most destinations one expand() call visits (guards against a huge fan-out)."""

_UNSUPPORTED = {"pipe": "a program", "file": "a file", "include": "an :include: list"}


class Target(Frozen):
    """One destination of an alias, as written (quotes removed).  Immutable, compared and
    hashed by value."""

    __slots__ = ("text", "kind", "line")

    text: str
    kind: str
    """``address`` (local name or address), ``user`` (``\\user``: a final local user),
    ``pipe``, ``file`` or ``include``."""
    line: int

    def __init__(self, text: str, kind: str, line: int) -> None:
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "line", line)


def _kind(dest: str) -> str:
    if dest.startswith("|"):
        return "pipe"
    if dest.startswith("/"):
        return "file"
    if dest[:9].lower() == ":include:":
        return "include"
    if dest.startswith("\\"):
        return "user"
    return "address"


def _strip_comment(line: str) -> str:
    quoted = False
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and quoted:
            i += 1
        elif ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i]
        i += 1
    return line


def _split_commas(text: str) -> list[str]:
    parts: list[str] = []
    quoted = False
    start = i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quoted:
            i += 1
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _balanced(text: str) -> bool:
    """Every double quote in ``text`` is closed (backslash escapes inside quotes)."""
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quoted:
            i += 1
        elif ch == '"':
            quoted = not quoted
        i += 1
    return not quoted


def _unquote(text: str) -> str | None:
    """The content of ``text`` when it is one quoted string, else None."""
    out: list[str] = []
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif ch == '"':
            return "".join(out) if i == len(text) - 1 else None
        else:
            out.append(ch)
            i += 1
    return None


class Aliases:
    """A parsed aliases file.  ``Aliases()`` has no aliases at all."""

    def __init__(self, entries: dict[str, list[Target]] | None = None,
                 path: str | None = None, warnings: Iterable[str] = ()) -> None:
        self._entries: dict[str, list[Target]] = entries or {}
        self.path = path
        self.warnings: list[str] = list(warnings)
        """Things newaliases should mention: repeated names, destinations dma cannot
        deliver to, names that can never match."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def names(self) -> list[str]:
        """The alias names, lower-case, in file order."""
        return list(self._entries)

    def targets(self, name: str) -> list[Target]:
        """The destinations of one alias (case-insensitive), [] when there is none."""
        return list(self._entries.get(name.lower(), ()))

    # --- reading ---------------------------------------------------------------------

    @classmethod
    def load(cls, path: str = DEFAULT_PATH) -> Aliases:
        """Reads an aliases file; a missing file means no aliases (as in C dma)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return cls(path=path)
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror or e}", path) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError("the line is not valid UTF-8", path,
                              data.count(b"\n", 0, e.start) + 1) from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: str = DEFAULT_PATH) -> Aliases:
        """Parses the contents of an aliases file; ``path`` is used in messages."""
        logical: list[tuple[int, str]] = []
        joining = False
        for lineno, raw in enumerate(text.split("\n"), 1):
            line = _strip_comment(raw.rstrip("\r"))
            cont = line.endswith("\\")
            if cont:
                line = line[:-1]
            if joining:
                start, before = logical[-1]
                logical[-1] = (start, before + " " + line)
            elif not line.strip():
                pass
            elif line[0] in " \t" and logical:
                start, before = logical[-1]
                logical[-1] = (start, before + " " + line)
            else:
                logical.append((lineno, line))
            joining = cont and bool(logical)

        entries: dict[str, list[Target]] = {}
        first_line: dict[str, int] = {}
        warnings: list[str] = []
        for lineno, line in logical:
            name, targets = cls._parse_entry(line, path, lineno)
            key = name.lower()
            if key in entries:
                warnings.append(f"{path}:{lineno}: alias {name!r} was already defined on"
                                f" line {first_line[key]}; the destinations are merged")
                entries[key].extend(targets)
            else:
                entries[key] = targets
                first_line[key] = lineno
            if "@" in name:
                warnings.append(f"{path}:{lineno}: alias name {name!r} contains '@', so it"
                                " never applies (aliases are for local names)")
            for t in targets:
                if t.kind in _UNSUPPORTED:
                    warnings.append(f"{path}:{lineno}: {name!r} delivers to"
                                    f" {_UNSUPPORTED[t.kind]} ({t.text!r}), which dma does"
                                    " not support; mail to it will be refused")
                elif t.kind == "address":
                    try:
                        parse_mailbox(t.text)
                    except AddressError as e:
                        warnings.append(f"{path}:{lineno}: {name!r}: {e};"
                                        " mail to it will be refused")
        return cls(entries, path, warnings)

    @staticmethod
    def _parse_entry(line: str, path: str, lineno: int) -> tuple[str, list[Target]]:
        for ch in line:
            if ch < " " and ch != "\t" or ch == "\x7f":
                raise ConfigError(f"control character {ch!r} in the entry", path, lineno)
        name, colon, rest = line.partition(":")
        name = name.strip()
        if not colon:
            raise ConfigError(f"expected 'name: destination, ...', got {line.strip()!r}",
                              path, lineno)
        if not name:
            raise ConfigError("missing alias name before ':'", path, lineno)
        for ch in name:
            if ch in " \t,\"":
                what = "a space" if ch in " \t" else repr(ch)
                raise ConfigError(f"alias name {name!r} contains {what}", path, lineno)
        if not rest.strip():
            raise ConfigError(f"alias {name!r} has no destination", path, lineno)
        targets: list[Target] = []
        for piece in _split_commas(rest):
            dest = piece.strip(" \t")
            if not dest:
                raise ConfigError(f"empty destination in alias {name!r} (a stray ',')",
                                  path, lineno)
            if not _balanced(dest):
                raise ConfigError(f"unbalanced quotes in {dest!r}", path, lineno)
            if dest.startswith('"'):
                inner = _unquote(dest)
                if inner is not None:  # else an address with a quoted local part
                    dest = inner.strip()
                    if not dest:
                        raise ConfigError(f"empty destination in alias {name!r}",
                                          path, lineno)
            kind = _kind(dest)
            if kind == "address" and not dest.startswith('"') and (" " in dest
                                                                    or "\t" in dest):
                raise ConfigError(f"destinations must be separated by commas: {dest!r}",
                                  path, lineno)
            if kind == "user":
                dest = dest[1:]
                if not dest or " " in dest or "\t" in dest or "@" in dest:
                    raise ConfigError(f"'\\' must be followed by a local user name, got"
                                      f" {piece.strip()!r}", path, lineno)
            targets.append(Target(dest, kind, lineno))
        return name, targets

    @classmethod
    def check(cls, path: str = DEFAULT_PATH) -> list[str]:
        """For ``newaliases``: parses the file (ConfigError on a syntax error) and returns
        the lines to show: the warnings, then ``PATH: N aliases``."""
        aliases = cls.load(path)
        count = len(aliases)
        return [*aliases.warnings, f"{path}: {count} alias{'' if count == 1 else 'es'}"]

    # --- expansion -------------------------------------------------------------------

    def expand(self, name: str, local_domains: Iterable[str] = ()) -> list[str]:
        """Expands one recipient through the aliases, recursively.

        ``name`` is a local name; an address whose domain is in ``local_domains`` (e.g.
        ``Config.local_domains``) counts as its local part, any other address comes
        back unchanged.  The results are local user names (no ``@``) and addresses
        (``user@domain``), duplicates removed, in order.  Lookups ignore case; a name
        without an alias (or met again on its own expansion path) is a final local
        user, kept as written.  Raises DataError when the expansion reaches a
        destination dma cannot deliver to (program, file, :include:), a malformed
        address, or goes deeper than MAX_DEPTH.
        """
        domains = {d.lower() for d in local_domains}
        out: list[str] = []
        seen: set[str] = set()
        steps = 0

        def emit(text: str, key: str) -> None:
            if key not in seen:
                seen.add(key)
                out.append(text)

        def walk(user: str, chain: tuple[str, ...], top: bool) -> None:
            nonlocal steps
            key = user.lower()
            targets = self._entries.get(key)
            if targets is None and top:
                targets = self._entries.get("*")
            if targets is None or key in chain:
                local = quote_local(user)
                emit(local, local)
                return
            if len(chain) >= MAX_DEPTH:
                raise DataError(f"alias {name!r}: alias loop or nesting deeper than"
                                f" {MAX_DEPTH} levels (at {user!r})")
            chain = (*chain, key)
            for t in targets:
                steps += 1
                if steps > MAX_STEPS:
                    raise DataError(f"alias {name!r} expands to more than {MAX_STEPS}"
                                    " destinations")
                where = f"{self.path}:{t.line}"
                if t.kind in _UNSUPPORTED:
                    raise DataError(f"alias {user!r} ({where}) delivers to"
                                    f" {_UNSUPPORTED[t.kind]} ({t.text!r}), which dma does"
                                    " not support")
                try:
                    address = parse_mailbox(t.text)
                except AddressError as e:
                    raise DataError(f"alias {user!r} ({where}): {e}") from None
                if t.kind == "user":
                    emit(str(address), str(address))
                elif address.domain is None or address.domain_ascii in domains:
                    walk(address.local, chain, False)
                else:
                    emit(str(address), f"{quote_local(address.local)}@{address.domain_ascii}")

        if "@" in name:
            address = parse_mailbox(name)
            if address.domain is not None and address.domain_ascii not in domains:
                return [str(address)]
            walk(address.local, (), True)
        else:
            walk(name, (), True)
        return out
