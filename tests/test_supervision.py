"""Supervision check: every record tokenized once (cached), lengths stored, bad records listed."""
import json
import os
import pickle

import pytest

from vlm_dist.convert.cli import main
from vlm_dist.data import lengths as L
from vlm_dist.contract.prompt import PromptEncoder
from vlm_dist.contract.records import write_records

N = 4


def rec(rid, user, answer, images=()):
    return {"id": rid, "images": list(images), "conversations": [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


GOOD = [
    rec("cap", "<image>\nDescribe the image in one sentence.", "A red circle on the left.", ["a.jpg"]),
    rec("two", "<image>\n<image>\nDescribe each image in order.", "Image 1: a dog. Image 2: a cat.", ["a", "b"]),
    rec("text", "Hello world.", "Yes."),
]
LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "good.jsonl"
    write_records(path, GOOD)
    return path


def test_lengths_match_the_encoder_and_samples_come_from_the_cache(records, tiny_models, tokenizer, tmp_path):
    table = L.tokenize_records(records, tiny_models["tokenizer"], "chatml", N, 512, num_workers=1)
    enc = PromptEncoder(tokenizer, "chatml", N)
    want = [enc.encode(r) for r in GOOD]
    assert table.lengths.tolist() == [len(s) for s in want]
    assert table.supervised.tolist() == [s.num_supervised for s in want]
    assert table.ok.all() and table.problems() == []
    for i, s in enumerate(want):
        got = table.sample(i)
        assert (got.id, got.input_ids, got.labels, got.image_keys) == (s.id, s.input_ids, s.labels, s.image_keys)
    assert [(i, s.input_ids) for i, s in table.iter_samples()] == [(i, s.input_ids) for i, s in enumerate(want)]
    L.check_supervision(table)   # nothing to report
    clone = pickle.loads(pickle.dumps(table))   # DataLoader workers get the path, not the buffers
    assert len(pickle.dumps(table)) < 1000 and clone.sample(1).input_ids == want[1].input_ids
    assert os.path.dirname(table.cache_path) == str(tmp_path)


def test_cache_hit_skips_tokenization_and_any_change_misses(records, tiny_models, monkeypatch, tmp_path):
    first = L.tokenize_records(records, tiny_models["tokenizer"], "plain", N, 512, num_workers=1)

    def boom(task):
        raise AssertionError("tokenized again despite a cache hit")
    monkeypatch.setattr(L, "_encode_chunk", boom)
    again = L.tokenize_records(records, tiny_models["tokenizer"], "plain", N, 512, num_workers=1)
    assert again.cache_path == first.cache_path and again.lengths.tolist() == first.lengths.tolist()
    monkeypatch.undo()

    other_len = L.tokenize_records(records, tiny_models["tokenizer"], "plain", N, 256, num_workers=1)
    other_n = L.tokenize_records(records, tiny_models["tokenizer"], "plain", N + 1, 512, num_workers=1)
    other_tpl = L.tokenize_records(records, tiny_models["tokenizer"], "chatml", N, 512, num_workers=1)
    write_records(records, GOOD[:2])
    other_file = L.tokenize_records(records, tiny_models["tokenizer"], "plain", N, 512, num_workers=1)
    paths = {t.cache_path for t in (first, other_len, other_n, other_tpl, other_file)}
    assert len(paths) == 5 and len(other_file) == 2
    assert (other_n.lengths - first.lengths).tolist() == [1, 2, 0]   # one more slot per image


def test_parallel_workers_give_the_same_table(records, tiny_models, tmp_path):
    one = L.tokenize_records(records, tiny_models["tokenizer"], "chatml", N, 512, num_workers=1,
                             cache_dir=tmp_path / "one")
    two = L.tokenize_records(records, tiny_models["tokenizer"], "chatml", N, 512, num_workers=2,
                             cache_dir=tmp_path / "two")
    assert one.table.equals(two.table)


def test_fail_fast_lists_over_long_unsupervised_and_invalid_records(tmp_path, tiny_models):
    path = tmp_path / "bad.jsonl"
    write_records(path, GOOD + [rec("long", LONG_TEXT, "Yes."),
                                rec("long_img", LONG_TEXT + " <image>", "Yes.", ["x.jpg"])])
    with open(path, "a") as f:
        f.write(json.dumps({"id": "broken", "images": ["a"], "conversations": [
            {"role": "user", "content": "no placeholder"}, {"role": "assistant", "content": "x"}]}) + "\n")
    table = L.tokenize_records(path, tiny_models["tokenizer"], "chatml", N, 48, num_workers=1)
    problems = {p["id"]: p for p in table.problems()}
    assert {k: p["reason"] for k, p in problems.items()} == {
        "long": "too_long", "long_img": "too_long", "broken": "invalid"}
    assert problems["long"]["length"] > 48 and problems["long"]["index"] == 3
    with pytest.raises(L.SupervisionError) as e:
        L.check_supervision(table)
    msg = str(e.value)
    assert "3 record(s) cannot be trained on" in msg and "'long' (record 3): too_long" in msg
    assert "'broken' (record 5): invalid" in msg and "max_seq_len=48" in msg
    assert table.ok.tolist() == [True, True, True, False, False, False]


def test_truncate_cuts_text_only_never_an_image_block(tmp_path, tiny_models, tokenizer):
    path = tmp_path / "trunc.jsonl"
    records = [rec("answer_long", "<image>\nDescribe.", LONG_TEXT, ["a.jpg"]),
               rec("prompt_long", LONG_TEXT, "Yes."),
               {"id": "image_late", "images": ["x.jpg"], "conversations": [
                   {"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Yes."},
                   {"role": "user", "content": LONG_TEXT + " <image>"}, {"role": "assistant", "content": "No."}]}]
    write_records(path, records)
    table = L.tokenize_records(path, tiny_models["tokenizer"], "chatml", N, 40, truncate=True, num_workers=1)
    reasons = {p["id"]: p["reason"] for p in table.problems()}
    # the long answer is cut to 40 tokens and keeps its image; a prompt filling the row leaves
    # nothing supervised; cutting before the late image would drop an image block
    assert reasons == {"prompt_long": "no_supervision", "image_late": "too_long"}
    s = table.sample(0)
    assert len(s) == 40 and s.truncated and s.image_keys == ["a.jpg"] and s.num_supervised > 0
    summary = L.summarize(table)
    assert summary["ok"] == 1 and summary["truncated"] == 1 and summary["length"]["max"] == 40


def test_summary_reports_lengths_and_supervised_fraction(records, tiny_models):
    table = L.tokenize_records(records, tiny_models["tokenizer"], "plain", N, 512, num_workers=1)
    s = L.summarize(table)
    lengths, sup = table.lengths, table.supervised
    assert s["tokens"] == lengths.sum() and s["supervised_tokens"] == sup.sum()
    assert s["supervised_fraction"] == round(sup.sum() / lengths.sum(), 4)
    assert s["images"] == 3 and s["text_only_records"] == 1
    assert s["length"]["min"] == lengths.min() and s["length"]["max"] == lengths.max()
    line = L.format_summary("good", s)
    assert line.startswith("good: 3/3 records usable; tokens min") and "supervised" in line


def test_check_cli_exit_status_and_side_files(records, tmp_path, tiny_models, capsys):
    argv = ["check", "--records", str(records), "--tokenizer", tiny_models["tokenizer"], "--template", "plain",
            "--image-tokens", str(N), "--max-seq-len", "512", "--workers", "1"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "good.supervision.json").read_text())["ok"] == 3
    assert (tmp_path / "good.problems.jsonl").read_text() == ""
    assert main(argv[:-3] + ["12", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "too_long" in out
    listed = [json.loads(x) for x in (tmp_path / "good.problems.jsonl").read_text().splitlines()]
    assert [p["id"] for p in listed] == ["cap", "two"]   # "text" fits in 12 tokens


def test_concurrent_callers_tokenize_once(records, tiny_models, monkeypatch):
    """Every rank calls tokenize_records at start-up: one computes, the others wait and map the file."""
    import threading
    calls = []
    real = L._encode_chunk
    monkeypatch.setattr(L, "_encode_chunk", lambda task: calls.append(1) or real(task))
    tables = []
    threads = [threading.Thread(target=lambda: tables.append(
        L.tokenize_records(records, tiny_models["tokenizer"], "plain", N, 512, num_workers=1)))
        for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(tables) == 3 and len(calls) == 1
    assert all(t.table.equals(tables[0].table) for t in tables)


def _bad_bytes_file(tmp_path):
    """GOOD plus one record, with a Latin-1 byte on line 3 (after a blank line 2)."""
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(r).encode() for r in GOOD + [rec("late", "Hi.", "Yes.")]]
    lines[1] = lines[1].replace(b"a cat", b"a caf\xe9")
    path.write_bytes(lines[0] + b"\n\n" + b"\n".join(lines[1:]) + b"\n")
    offset = len(lines[0]) + 2 + lines[1].index(b"\xe9")
    return path, offset


@pytest.mark.parametrize("workers", [1, 2])
def test_non_utf8_bytes_name_the_file_line_and_offset_and_leave_no_tmp(tmp_path, tiny_models, workers):
    path, offset = _bad_bytes_file(tmp_path)
    with pytest.raises(L.RecordError, match=rf"latin1.jsonl:3: not UTF-8 text \(byte 0xe9 at byte offset {offset}\)"):
        L.tokenize_records(path, tiny_models["tokenizer"], "chatml", N, 512, num_workers=workers)
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name or p.suffix == ".arrow") == []


def test_check_cli_names_bad_bytes_without_a_traceback(tmp_path, tiny_models, capsys):
    path, _ = _bad_bytes_file(tmp_path)
    assert main(["check", "--records", str(path), "--tokenizer", tiny_models["tokenizer"], "--template", "chatml",
                 "--max-seq-len", "512", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: not UTF-8" in err and "Traceback" not in err
    assert not any(".tmp" in p.name for p in tmp_path.iterdir())


def test_utf8_bom_is_read_as_utf8_sig(tmp_path, tiny_models):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in GOOD).encode())
    table = L.tokenize_records(path, tiny_models["tokenizer"], "chatml", N, 512, num_workers=1)
    assert table.problems() == [] and table.table.column("id").to_pylist() == ["cap", "two", "text"]


def test_check_counts_and_lists_duplicate_ids_as_a_warning(tmp_path, tiny_models, capsys):
    path = tmp_path / "dups.jsonl"
    write_records(path, GOOD + [GOOD[2], rec("cap", "Again?", "Yes.")])
    table = L.tokenize_records(path, tiny_models["tokenizer"], "chatml", N, 512, num_workers=1)
    assert L.duplicate_ids([table]) == [
        {"id": "text", "file": str(path), "index": 3, "first": f"{path} record 2"},
        {"id": "cap", "file": str(path), "index": 4, "first": f"{path} record 0"}]
    assert main(["check", "--records", str(path), "--tokenizer", tiny_models["tokenizer"], "--template", "chatml",
                 "--image-tokens", str(N), "--max-seq-len", "512", "--workers", "1"]) == 0   # kept: a warning
    out = capsys.readouterr().out
    assert "5/5 records usable" in out and "2 duplicate id(s)" in out and "WARN" in out
    assert json.loads((tmp_path / "dups.supervision.json").read_text())["duplicate_ids"] == 2
    listed = [json.loads(x) for x in (tmp_path / "dups.duplicates.jsonl").read_text().splitlines()]
    assert [(d["id"], d["index"]) for d in listed] == [("text", 3), ("cap", 4)]
