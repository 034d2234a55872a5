"""/etc/aliases: C dma's grammar, the kinder extras, expansion rules and every error."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dma.aliases import MAX_DEPTH, MAX_STEPS, Aliases, Target
from dma.errors import EX_CONFIG, EX_DATAERR, AddressError, ConfigError, DataError


def in_child_without_root(fn: Callable[[], object]) -> str:
    """Runs ``fn`` in a forked child that is not root (root can read any file) and
    returns ``str(result)`` or ``TypeName: message`` of what it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            out = str(fn())
        except BaseException as e:  # noqa: BLE001
            out = f"{type(e).__name__}: {e}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return data.decode()


def load(tmp_path: Path, text: str) -> Aliases:
    p = tmp_path / "aliases"
    p.write_text(text)
    return Aliases.load(str(p))


def syntax_error(tmp_path: Path, text: str) -> ConfigError:
    p = tmp_path / "aliases"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        Aliases.load(str(p))
    assert info.value.exit_code == EX_CONFIG
    return info.value


# --- reading the file ------------------------------------------------------------------


def test_missing_file_means_no_aliases(tmp_path: Path) -> None:
    a = Aliases.load(str(tmp_path / "missing"))
    assert len(a) == 0
    assert a.expand("root") == ["root"]


def test_empty_aliases_object() -> None:
    assert Aliases().expand("root") == ["root"]
    assert len(Aliases()) == 0


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Aliases.load(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: cannot read: Is a directory"


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "aliases"
    p.write_text("a: b\n")
    os.chmod(p, 0)
    assert in_child_without_root(lambda: Aliases.load(str(p))) == (
        f"ConfigError: {p}: cannot read: Permission denied")


def test_invalid_utf8(tmp_path: Path) -> None:
    p = tmp_path / "aliases"
    p.write_bytes(b"a: b\nc: d\xff\n")
    with pytest.raises(ConfigError) as info:
        Aliases.load(str(p))
    assert str(info.value) == f"{p}:2: the line is not valid UTF-8"


def test_debian_default_file(tmp_path: Path) -> None:
    a = load(tmp_path, """\
# /etc/aliases
mailer-daemon: postmaster
postmaster: root
nobody: root
hostmaster: root
usenet: root
news: root
webmaster: root
www: root
ftp: root
abuse: root
noc: root
security: root
""")
    assert len(a) == 12
    assert a.warnings == []
    assert a.expand("mailer-daemon") == ["root"]
    assert a.expand("www") == ["root"]


def test_comments_blank_lines_and_trailing_comment(tmp_path: Path) -> None:
    a = load(tmp_path, "\n# comment\n   # indented comment\n\t\na: b # trailing\nc: d#glued\n")
    assert a.names() == ["a", "c"]
    assert a.expand("a") == ["b"]
    assert a.expand("c") == ["d"]


def test_whitespace_around_colon_and_commas(tmp_path: Path) -> None:
    a = load(tmp_path, "a  :  b ,c,\td  \n")
    assert a.expand("a") == ["b", "c", "d"]


def test_continuation_by_leading_whitespace(tmp_path: Path) -> None:
    a = load(tmp_path, "a: b,\n  c,\n\td\ne: f\n")
    assert a.expand("a") == ["b", "c", "d"]
    assert a.expand("e") == ["f"]


def test_continuation_by_backslash(tmp_path: Path) -> None:
    a = load(tmp_path, "a: b, \\\nc, \\\nd\ne: f\n")
    assert a.expand("a") == ["b", "c", "d"]
    assert a.expand("e") == ["f"]


def test_backslash_newline_separates_like_whitespace(tmp_path: Path) -> None:
    e = syntax_error(tmp_path, "a: b\\\nc\n")
    assert str(e).endswith(":1: destinations must be separated by commas: 'b c'")


def test_continuation_across_comment_lines(tmp_path: Path) -> None:
    a = load(tmp_path, "a: b,\n# comment in between\n  c\n")
    assert a.expand("a") == ["b", "c"]


def test_first_line_indented_starts_an_entry(tmp_path: Path) -> None:
    assert load(tmp_path, "  a: b\n").expand("a") == ["b"]


def test_crlf_file(tmp_path: Path) -> None:
    a = load(tmp_path, "a: b,\r\n  c\r\nd: e\r\n")
    assert a.expand("a") == ["b", "c"]
    assert a.expand("d") == ["e"]


def test_quoted_destination(tmp_path: Path) -> None:
    a = load(tmp_path, 'a: "b", "c, d"@example.org\n')
    assert a.targets("a") == [Target("b", "address", 1),
                              Target('"c, d"@example.org', "address", 1)]
    assert a.expand("a") == ["b", '"c, d"@example.org']


def test_hash_inside_quotes_is_not_a_comment(tmp_path: Path) -> None:
    a = load(tmp_path, 'a: "|prog #1" # comment\n')
    assert a.targets("a") == [Target("|prog #1", "pipe", 1)]


def test_repeated_name_is_merged_with_a_warning(tmp_path: Path) -> None:
    a = load(tmp_path, "a: b\nc: d\nA: e\n")
    assert a.expand("a") == ["b", "e"]
    p = tmp_path / "aliases"
    assert a.warnings == [f"{p}:3: alias 'A' was already defined on line 1;"
                          " the destinations are merged"]


def test_name_with_at_sign_warns(tmp_path: Path) -> None:
    a = load(tmp_path, "a@example.org: b\n")
    assert "contains '@', so it never applies" in a.warnings[0]


def test_bad_destination_address_warns_and_fails_on_use(tmp_path: Path) -> None:
    a = load(tmp_path, "a: b..c@example.org\n")
    assert "two dots in a row in the local part" in a.warnings[0]
    with pytest.raises(DataError) as info:
        a.expand("a")
    assert str(info.value) == (f"alias 'a' ({tmp_path / 'aliases'}:1): invalid address"
                               " 'b..c@example.org': two dots in a row in the local part")


# --- syntax errors: one clear message each -----------------------------------------------


@pytest.mark.parametrize("text,line,message", [
    ("a b\n", 1, "expected 'name: destination, ...', got 'a b'"),
    ("ok: x\njunk\n", 2, "expected 'name: destination, ...', got 'junk'"),
    (": b\n", 1, "missing alias name before ':'"),
    ("a b: c\n", 1, "alias name 'a b' contains a space"),
    ("a,b: c\n", 1, "alias name 'a,b' contains ','"),
    ('"a": c\n', 1, "alias name '\"a\"' contains '\"'"),
    ("a:\n", 1, "alias 'a' has no destination"),
    ("a:   # nothing\n", 1, "alias 'a' has no destination"),
    ("a: b,\n", 1, "empty destination in alias 'a' (a stray ',')"),
    ("a: b,,c\n", 1, "empty destination in alias 'a' (a stray ',')"),
    ("a: , b\n", 1, "empty destination in alias 'a' (a stray ',')"),
    ("a: b c\n", 1, "destinations must be separated by commas: 'b c'"),
    ("a: b, c d@example.org\n", 1, "destinations must be separated by commas: 'c d@example.org'"),
    ('a: "b\n', 1, "unbalanced quotes in '\"b'"),
    ('a: b"c\n', 1, "unbalanced quotes in 'b\"c'"),
    ('a: ""\n', 1, "empty destination in alias 'a'"),
    ("a: \\ , b\n", 1, "'\\' must be followed by a local user name, got '\\\\'"),
    ("a: \\\n", 1, "alias 'a' has no destination"),  # a backslash at the end continues
    ("a: \\b@example.org\n", 1,
     "'\\' must be followed by a local user name, got '\\\\b@example.org'"),
    ("a: b\x01c\n", 1, "control character '\\x01' in the entry"),
    ("x: y\n\na: b,\n  c d\n", 3, "destinations must be separated by commas: 'c d'"),
])
def test_syntax_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    e = syntax_error(tmp_path, text)
    assert str(e) == f"{tmp_path / 'aliases'}:{line}: {message}"
    assert e.line == line


def test_parse_text_directly() -> None:
    a = Aliases.parse("a: b\n", "/etc/aliases")
    assert a.path == "/etc/aliases" and a.expand("a") == ["b"]
    with pytest.raises(ConfigError, match=r"^/etc/aliases:1: expected"):
        Aliases.parse("junk\n", "/etc/aliases")


# --- expansion -----------------------------------------------------------------------


def test_unaliased_name_is_itself(tmp_path: Path) -> None:
    assert load(tmp_path, "a: b\n").expand("root") == ["root"]


def test_recursive_expansion_in_order(tmp_path: Path) -> None:
    a = load(tmp_path, "team: alice, ops, carol@example.org\nops: bob, dave\n")
    assert a.expand("team") == ["alice", "bob", "dave", "carol@example.org"]


def test_duplicates_removed_preserving_order(tmp_path: Path) -> None:
    a = load(tmp_path, "all: x, g1, g2, x@Example.ORG\ng1: y, x\ng2: y, z, x@example.org\n")
    assert a.expand("all") == ["x", "y", "z", "x@example.org"]


def test_lookup_is_case_insensitive_results_keep_case(tmp_path: Path) -> None:
    a = load(tmp_path, "Postmaster: Root\n")
    assert "POSTMASTER" in a and "postmaster" in a
    assert a.expand("POSTMASTER") == ["Root"]
    assert a.expand("postmaster") == ["Root"]


def test_self_reference_keeps_a_local_copy(tmp_path: Path) -> None:
    a = load(tmp_path, "root: root, admin@example.org\n")
    assert a.expand("root") == ["root", "admin@example.org"]


def test_loop_ends_at_the_name_met_again(tmp_path: Path) -> None:
    a = load(tmp_path, "a: b\nb: c\nc: a\n")
    assert a.expand("a") == ["a"]
    assert a.expand("b") == ["b"]


def test_loop_with_other_destinations(tmp_path: Path) -> None:
    a = load(tmp_path, "a: b, x\nb: a, y\n")
    assert a.expand("a") == ["a", "y", "x"]


def test_backslash_user_is_final(tmp_path: Path) -> None:
    a = load(tmp_path, "bob: \\bob, bob@elsewhere.example\nalice: \\bob\n")
    assert a.expand("bob") == ["bob", "bob@elsewhere.example"]
    assert a.expand("alice") == ["bob"]  # not expanded further


def test_too_deep(tmp_path: Path) -> None:
    chain = "".join(f"a{i}: a{i + 1}\n" for i in range(MAX_DEPTH + 1))
    a = load(tmp_path, chain)
    with pytest.raises(DataError) as info:
        a.expand("a0")
    assert str(info.value) == (f"alias 'a0': alias loop or nesting deeper than {MAX_DEPTH}"
                               f" levels (at 'a{MAX_DEPTH}')")
    assert info.value.exit_code == EX_DATAERR
    assert a.expand(f"a{2}") == [f"a{MAX_DEPTH + 1}"]  # 31 levels is fine


def test_exactly_max_depth_is_fine(tmp_path: Path) -> None:
    chain = "".join(f"a{i}: a{i + 1}\n" for i in range(MAX_DEPTH))
    assert load(tmp_path, chain).expand("a0") == [f"a{MAX_DEPTH}"]


def test_huge_fan_out_is_bounded(tmp_path: Path) -> None:
    # 2**20 paths down a chain where every level names the next one twice
    lines = [f"l{i}: l{i + 1}, l{i + 1}\n" for i in range(20)]
    a = load(tmp_path, "".join(lines))
    with pytest.raises(DataError, match=f"expands to more than {MAX_STEPS} destinations"):
        a.expand("l0")


def test_catch_all_only_at_top_level(tmp_path: Path) -> None:
    a = load(tmp_path, "*: catchall\nteam: alice, bob\nalice: \\alice\n")
    assert a.expand("nobody") == ["catchall"]
    assert a.expand("team") == ["alice", "bob"]  # bob is not caught in nested expansion
    assert a.expand("catchall") == ["catchall"]  # the catch-all reaching itself


def test_catch_all_applies_to_existing_users_too(tmp_path: Path) -> None:
    # C dma consults '*' whenever no specific alias matches, whether the user exists or not
    a = load(tmp_path, "*: admin@example.org\n")
    assert a.expand("root") == ["admin@example.org"]


def test_catch_all_expands_recursively(tmp_path: Path) -> None:
    a = load(tmp_path, "*: postmaster\npostmaster: root\n")
    assert a.expand("whoever") == ["root"]


def test_local_domains_are_stripped_and_expanded(tmp_path: Path) -> None:
    a = load(tmp_path, "a: b@LocalHost, c@mail.example, d@remote.example\nb: \\bee\n")
    domains = ["localhost", "mail.example"]
    assert a.expand("a", domains) == ["bee", "c", "d@remote.example"]
    assert a.expand("a") == ["b@LocalHost", "c@mail.example", "d@remote.example"]


def test_expand_address_argument(tmp_path: Path) -> None:
    a = load(tmp_path, "a: b\n*: catchall\n")
    assert a.expand("a@localhost", ["localhost"]) == ["b"]
    assert a.expand("x@localhost", ["localhost"]) == ["catchall"]
    assert a.expand("a@remote.example", ["localhost"]) == ["a@remote.example"]
    with pytest.raises(AddressError):
        a.expand("a@@localhost")


def test_idna_destination_dedup(tmp_path: Path) -> None:
    a = load(tmp_path, "a: u@b\u00fccher.example, u@xn--bcher-kva.example\n")
    assert a.expand("a") == ["u@b\u00fccher.example"]


@pytest.mark.parametrize("dest,kind,what", [
    ('"|/usr/bin/procmail -f-"', "pipe", "a program"),
    ("|/usr/bin/prog", "pipe", "a program"),
    ("|/usr/bin/prog with args", "pipe", "a program"),
    ("/var/log/mail.dump", "file", "a file"),
    (":include:/etc/mail/list", "include", "an :include: list"),
    (":INCLUDE:/etc/mail/list", "include", "an :include: list"),
])
def test_unsupported_targets_parse_but_refuse_on_use(tmp_path: Path, dest: str, kind: str,
                                                     what: str) -> None:
    a = load(tmp_path, f"postmaster: root\nbad: root, {dest}\nvia: bad\n")
    text = dest.strip('"')
    assert a.targets("bad")[1] == Target(text, kind, 2)
    assert a.expand("postmaster") == ["root"]  # the rest of the file still works
    where = f"{tmp_path / 'aliases'}:2"
    assert a.warnings == [f"{where}: 'bad' delivers to {what} ({text!r}), which dma does not"
                          " support; mail to it will be refused"]
    for name in ("bad", "via"):
        with pytest.raises(DataError) as info:
            a.expand(name)
        assert str(info.value) == (f"alias 'bad' ({where}) delivers to {what} ({text!r}),"
                                   " which dma does not support")


# --- newaliases ----------------------------------------------------------------------


def test_check_reports(tmp_path: Path) -> None:
    p = tmp_path / "aliases"
    p.write_text("a: b\nc: |prog\n")
    report = Aliases.check(str(p))
    assert report[-1] == f"{p}: 2 aliases"
    assert len(report) == 2 and "delivers to a program" in report[0]
    p.write_text("a: b\n")
    assert Aliases.check(str(p)) == [f"{p}: 1 alias"]


def test_check_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "missing"
    assert Aliases.check(str(p)) == [f"{p}: 0 aliases"]


def test_check_syntax_error(tmp_path: Path) -> None:
    p = tmp_path / "aliases"
    p.write_text("a: b c\n")
    with pytest.raises(ConfigError, match=r":1: destinations must be separated by commas"):
        Aliases.check(str(p))


# --- properties ------------------------------------------------------------------------

_name = st.from_regex(r"\A[a-z][a-z0-9]{0,5}\Z")


@given(st.dictionaries(_name, st.lists(_name, min_size=1, max_size=4), max_size=8), _name)
def test_expansion_terminates_and_is_well_formed(graph: dict[str, list[str]],
                                                 start: str) -> None:
    text = "".join(f"{k}: {', '.join(v)}\n" for k, v in graph.items())
    a = Aliases.parse(text, "aliases")
    result = a.expand(start)
    assert result and len(result) == len(set(result))
    for user in result:
        # every result is a name without an alias, or one met again on its own path
        assert user not in graph or any(user in targets for targets in graph.values())
