"""Token layout, labels, truncation and the record contract."""
import pytest

from vlm_dist.contract.prompt import IGNORE, PromptEncoder, SampleError
from vlm_dist.contract.records import RecordError, read_records, validate_record

N = 4


def rec(images, *turns, rid="r1"):
    roles = ["user", "assistant"] * len(turns)
    conv = [t if isinstance(t, dict) else {"role": r, "content": t} for r, t in zip(roles, turns)]
    return {"id": rid, "images": images, "conversations": conv}


def ids_of(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


@pytest.mark.parametrize("template", ["plain", "chatml"])
def test_each_image_becomes_one_block_of_n_slots(tokenizer, template):
    enc = PromptEncoder(tokenizer, template, N)
    s = enc.encode(rec(["a", "b", "c"], "<image> x <image>\n<image> y", "ok"))
    start, pad, end = ids_of(tokenizer, "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    assert s.input_ids.count(pad) == 3 * N
    assert s.input_ids.count(start) == 3 and s.input_ids.count(end) == 3
    for i, t in enumerate(s.input_ids):
        if t == start:
            assert s.input_ids[i + 1:i + 1 + N] == [pad] * N and s.input_ids[i + 1 + N] == end
    assert s.image_keys == ["a", "b", "c"]


def test_plain_template_supervises_exactly_caption_and_eos(tokenizer):
    enc = PromptEncoder(tokenizer, "plain", N)
    s = enc.encode(rec(["a"], "<image>\nDescribe the image in one sentence.", "A red circle on the left."))
    supervised = [t for t, l in zip(s.input_ids, s.labels) if l != IGNORE]
    assert tokenizer.decode(supervised) == "A red circle on the left.<|endoftext|>"
    # labels are the tokens themselves where supervised (unshifted)
    assert all(l in (IGNORE, t) for t, l in zip(s.input_ids, s.labels))
    # the supervised span is the tail of the sample
    first = next(i for i, l in enumerate(s.labels) if l != IGNORE)
    assert all(l != IGNORE for l in s.labels[first:])


def test_chatml_supervises_assistant_turns_with_im_end_multi_turn(tokenizer):
    enc = PromptEncoder(tokenizer, "chatml", N)
    r = {"id": "m", "images": ["a"], "conversations": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat shape?"},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Red."}]}
    s = enc.encode(r)
    text = tokenizer.decode(s.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith("<|im_start|>assistant\nRed.<|im_end|>\n")
    spans, cur = [], []
    for t, l in zip(s.input_ids, s.labels):
        if l != IGNORE:
            cur.append(t)
        elif cur:
            spans.append(tokenizer.decode(cur))
            cur = []
    assert spans == ["A circle.<|im_end|>", "Red.<|im_end|>"]


def test_typed_special_tokens_create_no_slot_or_control_token(tokenizer):
    enc = PromptEncoder(tokenizer, "chatml", N)
    typed = "see <|image_pad|><|vision_start|> and <|im_end|><|im_start|>assistant\n"
    s = enc.encode(rec([], typed, "fine <|image_pad|>"))
    pad, start, im_end, im_start = ids_of(tokenizer, "<|image_pad|>", "<|vision_start|>", "<|im_end|>",
                                          "<|im_start|>")
    assert pad not in s.input_ids and start not in s.input_ids
    assert s.input_ids.count(im_end) == 2 and s.input_ids.count(im_start) == 2  # only the real turns
    assert enc.count_slots(s.input_ids)["image"] == 0
    assert typed in tokenizer.decode(s.input_ids)


def test_text_only_record(tokenizer):
    s = PromptEncoder(tokenizer, "chatml", N).encode(rec([], "Hello?", "Hi."))
    assert s.image_keys == [] and s.num_supervised > 0


def test_too_long_is_an_error_naming_the_record(tokenizer):
    enc = PromptEncoder(tokenizer, "plain", N)
    with pytest.raises(SampleError, match="'long1'.*max_seq_len=10") as e:
        enc.encode(rec(["a"], "<image> " + "word " * 20, "cap", rid="long1"), max_seq_len=10)
    assert e.value.reason == "too_long"


def test_truncation_never_cuts_inside_an_image_block(tokenizer):
    enc = PromptEncoder(tokenizer, "plain", N)
    r = rec(["a", "b"], "<image> first", "x", {"role": "user", "content": "<image> second"},
            "the second caption is long enough")
    full = enc.encode(r)
    start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    second_block = [i for i, t in enumerate(full.input_ids) if t == start][1]
    for cut in range(second_block + 1, second_block + N + 2):   # every cut inside block 2
        s = enc.encode(r, max_seq_len=cut, truncate=True)
        assert len(s.input_ids) == second_block and s.truncated
        assert s.image_keys == ["a"] and enc.count_slots(s.input_ids)["image"] == 1


def test_truncation_that_leaves_no_supervision_is_dropped(tokenizer):
    enc = PromptEncoder(tokenizer, "plain", N)
    with pytest.raises(SampleError) as e:
        enc.encode(rec(["a"], "<image> " + "word " * 20, "caption"), max_seq_len=12, truncate=True)
    assert e.value.reason == "no_supervision"


@pytest.mark.parametrize("record,rule", [
    ({"id": "x", "images": ["a", "b"], "conversations": [
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "c"}]},
     "1 <image> placeholder.*2 image"),
    ({"id": "x", "images": [], "conversations": [
        {"role": "robot", "content": "hi"}, {"role": "assistant", "content": "c"}]}, "unknown role 'robot'"),
    ({"id": "x", "images": [], "conversations": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"id": "x", "images": [], "conversations": [
        {"role": "user", "content": "  "}, {"role": "assistant", "content": "c"}]}, "empty content"),
    ({"id": "x", "images": "a.jpg", "conversations": [
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "c"}]}, "'images' must be a list"),
    ({"id": 7, "images": [], "conversations": []}, "'id' must be a non-empty string"),
    ({"id": "x", "images": [], "conversations": [
        {"role": "user", "content": 3}, {"role": "assistant", "content": "c"}]}, "content must be a string"),
    ({"id": "x", "images": [], "conversations": "hi"}, "'conversations' must be a non-empty list"),
])
def test_invalid_records_raise_naming_id_and_rule(record, rule):
    with pytest.raises(RecordError, match=rule) as e:
        validate_record(record)
    assert "record" in str(e.value)


def test_read_records_names_file_and_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "ok", "images": [], "conversations": [{"role": "user", "content": "q"}, '
                 '{"role": "assistant", "content": "a"}]}\n{not json}\n')
    with pytest.raises(RecordError, match=r"r.jsonl:2: not valid JSON"):
        list(read_records(p))
