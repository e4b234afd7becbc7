"""The filter on realistic SFT files: ordinary math and code pass untouched, each kind is counted, and a
bad line leaves the previous output as it was."""

from __future__ import annotations

import json

from qwenkit.cli import main as cli_main

# Look-alikes every SFT set holds: long numbers, floats, hashes, UUIDs, versions, dates, localhost, slices
CLEAN = [
    {
        "messages": [
            {"role": "user", "content": "What is 2^64 and 0.1 + 0.2 in Python?"},
            {
                "role": "assistant",
                "content": "2^64 = 18446744073709551616; 0.1 + 0.2 prints 0.30000000000000004, "
                "and 3.14159265358 is pi to 11 places.",
            },
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "Why does my server only answer on localhost?"},
            {
                "from": "gpt",
                "value": "Bind it with app.run(host='0.0.0.0', port=8000), then try http://127.0.0.1:8000/ "
                "(netmask 255.255.255.0). Built with Flask 3.0.3, torch version 2.1.0.1.",
            },
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Reverse a list and tokenize it, logging the run id."},
            {
                "role": "assistant",
                "content": "```python\nrev = xs[::-1]; odd = xs[1::2]\ntoken = tokenizer.encode(text)\n"
                "api_key = os.getenv('OPENAI_API_KEY')\n"
                "run_id = '123e4567-e89b-12d3-a456-426614174000'\n"
                "# commit 3f786850e387550fdab836ed7e6dc881de23001b\n"
                "created = 1700000000004  # 2024-01-15T10:30:45Z\n```",
            },
        ]
    },
]

DIRTY = {
    "messages": [
        {
            "role": "user",
            "content": "我是张三，电话+86 138-1234-5678，身份证11010519491231002X，"
            "卡号6217 0027 1000 0684 874。",
        },
        {
            "role": "assistant",
            "content": "Use postgres://admin:s3cretpw@10.1.2.3/app, mail ops+alerts@mail.example.co.uk "
            "or call (415) 555-2671; rotate AKIAIOSFODNN7EXAMPLE.",
        },
    ]
}


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_ordinary_sft_data_passes_untouched(tmp_path, capsys):
    src, out = tmp_path / "clean.jsonl", tmp_path / "out.jsonl"
    write(src, CLEAN)
    assert cli_main(["filter", str(src), str(out)]) == 0
    assert [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] == CLEAN
    assert "3 examples: 0 with sensitive data (nothing); 0 dropped" in capsys.readouterr().err


def test_each_kind_is_masked_and_counted(tmp_path, capsys):
    src, out, report = tmp_path / "d.jsonl", tmp_path / "out.jsonl", tmp_path / "r.json"
    write(src, [*CLEAN, DIRTY])
    assert cli_main(["filter", str(src), str(out), "--report", str(report)]) == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert rows[:3] == CLEAN
    assert rows[3]["messages"][0]["content"] == "我是张三，电话[PHONE]，身份证[ID_CARD]，卡号[BANK_CARD]。"
    assert rows[3]["messages"][1]["content"] == (
        "Use postgres://[SECRET]@[IP]/app, mail [EMAIL] or call [PHONE]; rotate [SECRET]."
    )
    r = json.loads(report.read_text(encoding="utf-8"))
    counts = {"phone": 2, "id_card": 1, "bank_card": 1, "secret": 2, "ip": 1, "email": 1}
    assert (r["examples"], r["flagged"], r["dropped"], r["counts"]) == (4, 1, 0, counts)
    assert {w["where"] for w in r["findings"]} == {f"{src}:4"}
    assert capsys.readouterr().err.endswith(
        "4 examples: 1 with sensitive data "
        "(bank_card 1, email 1, id_card 1, ip 1, phone 2, secret 2); 0 dropped\n"
    )
    drop = tmp_path / "drop.jsonl"
    assert cli_main(["filter", str(src), str(drop), "--mode", "drop"]) == 0
    assert [json.loads(x) for x in drop.read_text(encoding="utf-8").splitlines()] == CLEAN
    assert "4 examples: 1 with sensitive data" in capsys.readouterr().err


def test_a_bad_line_names_its_number_and_keeps_the_old_output(tmp_path, capsys):
    src, out = tmp_path / "d.jsonl", tmp_path / "out.jsonl"
    out.write_text("previous\n")
    write(src, [DIRTY, CLEAN[0]])
    with src.open("a", encoding="utf-8") as f:
        f.write('{"messages": [{"role": "user", "content": "13812345678"}\n')
    assert cli_main(["filter", str(src), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}:3: invalid JSON") and err.count("\n") == 1
    assert out.read_text() == "previous\n"
