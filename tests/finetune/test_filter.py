"""The sensitive-data filter: a catalogue of positives and look-alike negatives with exact findings."""

from __future__ import annotations

import json

import pytest

from qwenkit.cli import main as cli_main
from qwenkit.finetune.sensitive import Detector, luhn_ok, valid_cn_id

CATALOGUE = [
    # (text, [(kind, matched text)])
    ("mail me at li.wei+ml@example.com.cn today", [("email", "li.wei+ml@example.com.cn")]),
    ("联系邮箱zhang_san@qq.com。", [("email", "zhang_san@qq.com")]),
    ("not an email: user@localhost or @handle", []),
    ("我的电话13812345678，谢谢", [("phone", "13812345678")]),
    ("call +86 138-1234-5678 now", [("phone", "+86 138-1234-5678")]),
    ("手机:008613912345678", [("phone", "008613912345678")]),
    ("order no. 12812345678 (starts 12: not a mobile)", []),
    ("138123456789 has 12 digits", []),
    ("London office +44 20 7946 0958.", [("phone", "+44 20 7946 0958")]),
    ("US: +1 (415) 555-2671", [("phone", "+1 (415) 555-2671")]),
    ("score +3 2 points", []),
    # US numbers without +1, as Americans write them: once passed
    (
        "US (415) 555-2671 or 415-555-2671, NY 212.555.0199",
        [("phone", "(415) 555-2671"), ("phone", "415-555-2671"), ("phone", "212.555.0199")],
    ),
    ("ranges 100-200-3000, ISBN 0-306-40615-2, ext 555-1234, 2024-555-1234", []),
    ("身份证11010519491231002X已登记", [("id_card", "11010519491231002X")]),
    ("id 110105194912310021 has a wrong check digit", []),
    ("id 110105194913310029 has month 13", []),
    ("card 4111 1111 1111 1111 expires", [("bank_card", "4111 1111 1111 1111")]),
    ("卡号6222021234567890123", []),  # UnionPay-like but fails Luhn
    ("卡号6217002710000684874", [("bank_card", "6217002710000684874")]),
    ("card 4111111111111112 is a typo", []),
    # as cards are written: 4-4-4-4(-3) groups, Amex 4-6-5
    ("卡号 6217 0027 1000 0684 874", [("bank_card", "6217 0027 1000 0684 874")]),
    (
        "cards 4111111111111111 5555555555554444",
        [("bank_card", "4111111111111111"), ("bank_card", "5555555555554444")],
    ),
    ("amex 3782-822463-10005", [("bank_card", "3782-822463-10005")]),
    # numbers that pass Luhn but are no card: a 13-digit millisecond timestamp (one in ten passed),
    # a float's digits after the point, single digits in a list, a prefix no card network issues
    ("created_at: 1700000000004", []),
    ("print(0.1) # 0.5555555555554444", []),
    ("digits 4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1", []),
    ("id 1000000000000008", []),
    # a decimal's digits are not a mobile number either: pi to 11 places
    ("pi = 3.14159265358", []),
    ("server 192.168.1.20 and 8.8.8.8", [("ip", "192.168.1.20"), ("ip", "8.8.8.8")]),
    ("version 1.2.3.4.5 and 999.1.1.1", []),
    ("v6 2001:db8::8a2e:370:7334 here", [("ip", "2001:db8::8a2e:370:7334")]),
    ("time 12:30:45 is not an address", []),
    # an address is never part of a word: code's scopes were masked ("st[IP]vector", "Foo[IP]r[IP]z()")
    ("std::vector<int> v; Foo::Bar::baz(); use std::io::Result;", []),
    # Private ranges count (an internal host in a pasted log or config maps a network); addresses that
    # name no host do not: loopback, unspecified, multicast, reserved (a netmask)
    ("link-local fe80::1%eth0, loopback [::1]:8080", [("ip", "fe80::1")]),
    (
        "ssh to 10.0.0.5, CGNAT 100.64.1.2, ULA fd12:3456:789a::1",
        [("ip", "10.0.0.5"), ("ip", "100.64.1.2"), ("ip", "fd12:3456:789a::1")],
    ),
    ("app.run(host='0.0.0.0') then curl http://127.0.0.1:8000/ or [::]:80", []),
    ("netmask 255.255.255.0 broadcast 255.255.255.255, mDNS 224.0.0.251, ff02::1", []),
    # Python slices and short scopes are reserved IPv6 space, never an address here
    ("s[::2], a[1::2], ns a::b and b:: c", []),
    # a version is not an address, though 1.2.3.4 parses as one
    ("version 1.2.3.4, v10.0.0.1, 版本 2.0.0.1, User-Agent: Chrome/120.0.0.0 Safari/537.36", []),
    ("地址2001:db8::1。", [("ip", "2001:db8::1")]),
    ("OPENAI key sk-abcdefghijklmnopqrstuvwx123", [("secret", "sk-abcdefghijklmnopqrstuvwx123")]),
    ("aws AKIAIOSFODNN7EXAMPLE", [("secret", "AKIAIOSFODNN7EXAMPLE")]),
    ("password = hunter2hunter2", [("secret", "hunter2hunter2")]),
    ("password is short=abc", []),
    ("login with password=hunter2 now", [("secret", "hunter2")]),  # under 8: once passed unmasked
    ('passwd: "p@ss"', [("secret", "p@ss")]),
    ("Reset your password: click the link", []),
    # JSON and Python-dict keys close their quote before the colon (a config pasted in a question, a
    # tool call's arguments): once passed unmasked
    ('cfg {"api_key": "abcd1234efgh5678"}', [("secret", "abcd1234efgh5678")]),
    ("{'password': 'hunter2!'}", [("secret", "hunter2!")]),
    ('{"access_token":"ya29.a0AfH6SMBx"}', [("secret", "ya29.a0AfH6SMBx")]),
    # AWS's secret access key (its AKIA key id above was found, the secret beside it passed), as an
    # environment variable and as ~/.aws/credentials writes it; and other private keys' values
    (
        "export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        [("secret", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")],
    ),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG", [("secret", "wJalrXUtnFEMI/K7MDENG")]),
    ('{"private_key": "MIIEvQIBADANBgkq"}', [("secret", "MIIEvQIBADANBgkq")]),
    ("the access key: see the console", []),
    # credentials in a URL: the password once passed (only the host was masked, or part of it as an e-mail)
    (
        "DATABASE_URL=postgres://admin:s3cretpw@db.example.com:5432/app",
        [("secret", "admin:s3cretpw")],
    ),
    ("mysql://root:root123@10.0.0.5/db", [("secret", "root:root123"), ("ip", "10.0.0.5")]),
    ("redis://:mypassword@cache:6379/0", [("secret", ":mypassword")]),
    # GitHub's other token families, AWS's temporary keys, bearer tokens
    (
        "GH github_pat_11ABCDEFG0abcdefghijkl_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTU",
        [
            (
                "secret",
                "github_pat_11ABCDEFG0abcdefghijkl_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTU",
            )
        ],
    ),
    ("gho_abcdefghijklmnopqrstuvwxyz0123456789 ok", [("secret", "gho_abcdefghijklmnopqrstuvwxyz0123456789")]),
    ("sts ASIAIOSFODNN7EXAMPLE", [("secret", "ASIAIOSFODNN7EXAMPLE")]),
    (
        "Authorization: Bearer 8f14e45fceea167a5a36dedd4bea2543",
        [("secret", "8f14e45fceea167a5a36dedd4bea2543")],
    ),
    ("the bearer of this letter, Bearer YOUR_TOKEN_HERE", []),
    # code is not a secret: a call, a subscript, a type or a plain name is what a key is assigned from
    ("token = tokenizer.encode(text)", []),
    ("api_key = os.getenv('OPENAI_API_KEY'); password=os.environ['PW']", []),
    ("password = getpass.getpass(); secret = generate_secret()", []),
    ("def f(token: torch.Tensor, secret_key: Optional[str]): token = tokenizer", []),
    ("api_key = 'abcd1234efgh'", [("secret", "abcd1234efgh")]),
    ("HF_TOKEN=AbcdEfghIjklMnop set", [("secret", "AbcdEfghIjklMnop")]),
    ("login(hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh)", [("secret", "hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh")]),
    ("project Bluebird launch", [("keyword", "Bluebird")]),
    ("内部代号青龙计划", [("keyword", "青龙")]),
]


@pytest.mark.parametrize(("text", "expected"), CATALOGUE)
def test_catalogue(text, expected):
    found = Detector(["bluebird", "青龙"]).find(text)
    assert [(f.kind, f.text) for f in found] == expected
    for f in found:
        assert text[f.start : f.end] == f.text


def test_checksums():
    assert valid_cn_id("11010519491231002X") and not valid_cn_id("110105194912310021")
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_a_tool_calls_json_arguments_are_masked(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    call = {"name": "login", "arguments": json.dumps({"user": "li", "password": "hunter2!"})}
    row = {
        "messages": [
            {"role": "user", "content": "log me in"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        ]
    }
    src.write_text(json.dumps(row) + "\n")
    assert cli_main(["filter", str(src), str(tmp_path / "out.jsonl")]) == 0
    out = json.loads((tmp_path / "out.jsonl").read_text())
    masked = out["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(masked) == {"user": "li", "password": "[SECRET]"}
    assert "1 examples: 1 with sensitive data (secret 1); 0 dropped" in capsys.readouterr().err


def test_filter_command_masks_and_drops(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": "email a@b.io"},
                {"role": "assistant", "content": "ok, 13812345678"},
            ]
        },
        {"messages": [{"role": "user", "content": "clean"}, {"role": "assistant", "content": "fine"}]},
    ]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "kw.txt").write_text("# comment\nfine\n")
    assert cli_main(["filter", str(src), str(tmp_path / "masked.jsonl")]) == 0
    masked = [json.loads(x) for x in (tmp_path / "masked.jsonl").read_text().splitlines()]
    assert masked[0]["messages"][0]["content"] == "email [EMAIL]"
    assert masked[0]["messages"][1]["content"] == "ok, [PHONE]"
    assert masked[1] == rows[1]
    err = capsys.readouterr().err
    assert "2 examples: 1 with sensitive data (email 1, phone 1); 0 dropped" in err
    assert "d.jsonl:1 messages[0].content email" in err
    assert (
        cli_main(
            [
                "filter",
                str(src),
                str(tmp_path / "dropped.jsonl"),
                "--mode",
                "drop",
                "--keywords",
                str(tmp_path / "kw.txt"),
            ]
        )
        == 0
    )
    assert (tmp_path / "dropped.jsonl").read_text() == ""
    assert cli_main(["filter", str(tmp_path / "missing.jsonl"), str(tmp_path / "x.jsonl")]) == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_filter_refuses_outputs_it_would_lose_or_clobber(tmp_path, capsys):
    """OUT and the report are checked before anything is read or written: an existing OUT needs
    --overwrite (the input itself is never replaced), and a report path that cannot be written leaves
    no filtered file behind."""
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"text": "mail me at a@b.io"}) + "\n")
    afile, out = tmp_path / "afile", tmp_path / "o.jsonl"
    afile.write_text("x")
    cases = [
        (
            [str(src), str(src), "--overwrite"],
            f"error: {src} is the input data; write the filtered data to another file\n",
        ),
        (
            [str(src), str(tmp_path / "afile")],
            f"error: {tmp_path / 'afile'} already exists; pass --overwrite to replace it\n",
        ),
        ([str(src), str(tmp_path)], f"error: {tmp_path} is a directory; give a file name\n"),
        (
            [str(src), str(tmp_path / "o.jsonl"), "--report", str(tmp_path / "afile" / "r.json")],
            f"error: cannot write {afile / 'r.json'}: {afile} is a file, not a directory\n",
        ),
        (
            [str(src), str(tmp_path / "o.jsonl"), "--report", str(tmp_path / "o.jsonl")],
            f"error: OUT and --report are the same file {out}; give the report its own name\n",
        ),
        (  # once said "write the filtered data to another file" of the report
            [str(src), str(out), "--report", str(src), "--overwrite"],
            f"error: --report {src} is the input data; write the report to another file\n",
        ),
        (  # once replaced the keyword list with the filtered data
            [str(src), str(afile), "--keywords", str(afile), "--overwrite"],
            f"error: {afile} is the --keywords file; write the output to another file\n",
        ),
        (
            [str(src), str(out), "--report", str(afile), "--keywords", str(afile), "--overwrite"],
            f"error: {afile} is the --keywords file; write the output to another file\n",
        ),
    ]
    for args, message in cases:
        assert cli_main(["filter", *args]) == 2
        assert capsys.readouterr().err == message
    assert not (tmp_path / "o.jsonl").exists() and (tmp_path / "afile").read_text() == "x"
    assert cli_main(["filter", str(src), str(tmp_path / "afile"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "afile").read_text()) == {"text": "mail me at [EMAIL]"}


def test_filter_creates_missing_parent_directories_of_out_and_report(tmp_path, capsys):
    """As every command's output: missing parent directories are created, for the report as for OUT (the
    report's were not: OUT was written, then the report failed with exit 2)."""
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"text": "mail me at a@b.io"}) + "\n")
    out, report = tmp_path / "a" / "b" / "clean.jsonl", tmp_path / "c" / "d" / "report.json"
    assert cli_main(["filter", str(src), str(out), "--report", str(report)]) == 0
    assert json.loads(out.read_text()) == {"text": "mail me at [EMAIL]"}
    written = json.loads(report.read_text())
    assert written["flagged"] == 1 and written["counts"] == {"email": 1}
    assert "error" not in capsys.readouterr().err


def test_an_empty_keyword_file_is_refused(tmp_path, capsys):
    """An empty (or comments-only) --keywords file once filtered as if no keywords were asked for."""
    src, words, out = tmp_path / "d.jsonl", tmp_path / "w.txt", tmp_path / "o.jsonl"
    src.write_text(json.dumps({"text": "project Bluebird"}) + "\n")
    words.write_text("# our code names\n\n")
    assert cli_main(["filter", str(src), str(out), "--keywords", str(words)]) == 2
    assert capsys.readouterr().err == (
        f"error: {words}: the keyword file holds no keywords (one a line; # starts a comment)\n"
    )
    assert not out.exists()


def test_filter_refuses_input_with_nothing_to_check(tmp_path, capsys):
    """An empty file, or a record with no text outside role-like keys, is refused by name: passing it
    on would report a clean data set that was never looked at. Nothing is written."""
    empty, textless, out = tmp_path / "empty.jsonl", tmp_path / "textless.jsonl", tmp_path / "o.jsonl"
    empty.write_text("\n\n")
    textless.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": ""}], "score": 3})
        + "\n"
    )
    assert cli_main(["filter", str(empty), str(out)]) == 2
    assert capsys.readouterr().err == f"error: {empty}: no records to filter (the file is empty)\n"
    assert cli_main(["filter", str(textless), str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {textless}:2: the record holds no text to check (no non-empty string values)\n"
    )
    assert not out.exists()


def test_finetune_refuses_filter_keywords_without_filter(tmp_path, capsys):
    """`finetune --filter-keywords words.txt` without --filter once trained on the unfiltered data, the
    keywords and every e-mail address included, without a word; now it is refused before anything loads."""
    words = tmp_path / "words.txt"
    words.write_text("bluebird\n")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "project Bluebird, bob@example.com"}) + "\n")
    out = tmp_path / "o"
    assert (
        cli_main(
            ["finetune", str(tmp_path / "no-model"), str(data), str(out), "--filter-keywords", str(words)]
        )
        == 2
    )
    assert capsys.readouterr().err == (
        "error: --filter-keywords applies with --filter; pass both to mask sensitive data\n"
    )
    assert not out.exists() and not (tmp_path / "o.training").exists()


def test_a_full_disk_leaves_no_half_report_and_names_it(tmp_path, capsys, monkeypatch):
    """The report was written in place: a full disk left a truncated JSON file of the report's name (and
    'error: No space left on device', naming no file). Now it is whole or absent, the old one kept."""
    import errno

    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"text": "mail me at a@b.io"}) + "\n")
    out, report = tmp_path / "clean.jsonl", tmp_path / "report.json"
    report.write_text("old report\n")
    real_dump = json.dump

    def dump_then_full(obj, f, **kwargs):  # what a disk that fills mid-write does: part lands, then ENOSPC
        f.write(json.dumps(obj, **kwargs)[:20])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", dump_then_full)
    argv = ["filter", str(src), str(out), "--report", str(report), "--overwrite"]
    assert cli_main(argv) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"error: disk full while writing {report} (")
    assert last.endswith("GB free); the partial output was removed")
    assert report.read_text() == "old report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl", "d.jsonl", "report.json"]
    monkeypatch.setattr(json, "dump", real_dump)
    assert cli_main(argv) == 0 and json.loads(report.read_text())["counts"] == {"email": 1}


def test_out_and_report_get_the_permissions_the_umask_gives(tmp_path, capsys):
    """OUT came from mkstemp and stayed private (0600) where every other output is 0644 under umask 022."""
    import os

    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"text": "mail me at a@b.io"}) + "\n")
    old = os.umask(0o022)
    try:
        assert (
            cli_main(["filter", str(src), str(tmp_path / "o.jsonl"), "--report", str(tmp_path / "r.json")])
            == 0
        )
    finally:
        os.umask(old)
    assert (tmp_path / "o.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_a_byte_order_mark_in_the_files_is_skipped(tmp_path):
    """Files saved by Windows editors start with a BOM: it stuck to the first keyword ("\ufeffBluebird"),
    which then matched nothing, and the data file's first line was refused."""
    src, words, out = tmp_path / "d.jsonl", tmp_path / "w.txt", tmp_path / "o.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "project Bluebird ships"}).encode() + b"\n")
    words.write_bytes(b"\xef\xbb\xbfBluebird\n")
    assert cli_main(["filter", str(src), str(out), "--keywords", str(words)]) == 0
    assert json.loads(out.read_text()) == {"text": "project [KEYWORD] ships"}
