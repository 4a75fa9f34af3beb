"""The tokenizer interface against what `tokenizers` and transformers 5.24 compute: encode/decode on
mixed text, emoji and special tokens, chat templates rendered to the same text and ids as
`apply_chat_template`, incremental decoding joined equal to one decode. Expected values are committed
by scripts/hf_tokenizer_fixtures.py (the `.[hf]` extra); no transformers here."""

import json
import os

import pytest

from helpers import REPO
from moejax.config.model import load_config
from moejax.errors import UserError
from moejax.serving.chat import chat_messages
from moejax.tokenizers import ByteTokenizer, copy_tokenizer_files, load_tokenizer, tokenizer_dir
from moejax.tokenizers.chat import ChatTemplateError, content_format, render
from moejax.tokenizers.hf import HFTokenizer

FIXTURES = os.path.join(REPO, "tests", "data", "tokenizer-fixtures")
EXPECTED = json.load(open(os.path.join(FIXTURES, "expected.json")))
DIRS = {"shakespeare-bpe": os.path.join(REPO, "data", "shakespeare-bpe"),
        "tok-sp-like": os.path.join(FIXTURES, "tok-sp-like")}
LONG = open(os.path.join(REPO, "data", "tinyshakespeare.txt")).read()[5000:8000] + " 👨‍👩‍👧‍👦 日本語 café ❤️ end"


@pytest.fixture(scope="module", params=sorted(DIRS))
def tok(request):
    return request.param, HFTokenizer(DIRS[request.param])


def test_encode_and_decode_as_the_tokenizers_library(tok):
    name, t = tok
    cases = EXPECTED[name]["encode"]
    assert len(cases) == 8
    for c in cases:
        assert t.encode(c["text"]) == c["ids_special"], c["text"]
        assert t.encode(c["text"], add_special_tokens=False) == c["ids_plain"], c["text"]
        assert t.decode(c["ids_special"]) == c["decode_skip"], c["text"]
        assert t.decode(c["ids_special"], skip_special_tokens=False) == c["decode_keep"], c["text"]
    assert [[i, t.token_str(i)] for i, _ in EXPECTED[name]["id_tokens"]] == EXPECTED[name]["id_tokens"]


def test_special_tokens_and_every_eos_id_from_the_files(tok):
    name, t = tok
    sp = EXPECTED[name]["specials"]
    assert t.vocab_size == sp["vocab_size"]
    assert list(t.eos_ids) == sp["eos_token_ids"]  # generation_config.json's list (or its one int)
    assert t.bos_id == sp["bos_token_id"]
    assert {k: t.special.get(k) for k in ("bos_token", "eos_token", "pad_token")} == {
        k: sp[k] for k in ("bos_token", "eos_token", "pad_token")}


def test_the_chat_template_renders_what_apply_chat_template_renders(tok):
    name, t = tok
    assert content_format(t.chat_template) == EXPECTED[name]["content_format"]
    chats = EXPECTED[name]["chat"]
    assert len(chats) >= 5
    for c in chats:
        msgs = chat_messages({"messages": c["messages"]}, content_format(t.chat_template) == "openai")
        text = render(t.chat_template, msgs, t.special, c["add_generation_prompt"])
        assert text == c["text"], c["name"]
        assert t.encode(text, add_special_tokens=False) == c["ids"], c["name"]


@pytest.mark.parametrize("prompt_len", [0, 40])
def test_incremental_decoding_joins_to_one_decode(tok, prompt_len):
    _, t = tok
    ids = t.encode(LONG, add_special_tokens=False)
    prompt, gen = ids[:prompt_len], ids[prompt_len:]
    d = t.detokenizer(prompt)
    pieces = [d.step(i) for i in gen]
    joined = "".join(pieces) + d.flush()
    want = t.decode(gen) if not prompt else t.decode(prompt + gen)[len(t.decode(prompt)):]
    assert joined == want
    assert not any("\ufffd" in p for p in pieces)  # never half a character (the emoji span several tokens)
    assert sum(1 for p in pieces if p == "") > 0  # some steps waited for the rest of a character
    # a generation that ends inside a character: flush gives what one decode shows (a replacement char)
    text_of = lambda ids: t.decode(ids) if not prompt else t.decode(prompt + ids)[len(t.decode(prompt)):]
    cut = next(j for j in range(1, len(gen)) if text_of(gen[:j]).endswith("\ufffd"))
    d = t.detokenizer(prompt)
    early = "".join(d.step(i) for i in gen[:cut])
    tail = d.flush()
    assert early + tail == text_of(gen[:cut]) and tail.endswith("\ufffd")


def test_bytes_stream_never_splits_a_character():
    t = ByteTokenizer(256)
    ids = t.encode("日本 ❤️ x")
    d = t.detokenizer([])
    pieces = [d.step(i) for i in ids]
    assert "".join(pieces) + d.flush() == "日本 ❤️ x" and "\ufffd" not in "".join(pieces)


def test_a_template_error_and_a_bad_template_are_clear():
    with pytest.raises(ChatTemplateError, match="refused these messages: no system role"):
        render("{{ raise_exception('no system role') }}", [{"role": "user", "content": "x"}], {})
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render("{% for m in messages %}", [{"role": "user", "content": "x"}], {})
    # the sandbox: a template cannot reach Python internals
    with pytest.raises(ChatTemplateError, match="refused"):
        render("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}], {})


def test_a_tokenizer_larger_than_the_model_or_missing_is_refused(tmp_path):
    cfg = load_config("tiny")  # a 256-id vocabulary
    with pytest.raises(UserError, match="has 2048 ids, more than the model's vocabulary of 256"):
        load_tokenizer(DIRS["shakespeare-bpe"], cfg)
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        load_tokenizer(str(tmp_path), cfg)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json: not a tokenizer"):
        load_tokenizer(str(tmp_path), cfg)


def test_a_checkpoint_carries_its_tokenizer_files(tmp_path):
    ckpt = tmp_path / "ckpt"
    copied = copy_tokenizer_files(DIRS["tok-sp-like"], str(ckpt / "tokenizer"))
    assert sorted(copied) == sorted(os.listdir(DIRS["tok-sp-like"]))
    assert tokenizer_dir(str(ckpt)) == str(ckpt / "tokenizer") and tokenizer_dir(str(tmp_path)) is None
    t = load_tokenizer(tokenizer_dir(str(ckpt)), load_config("shakespeare-bpe"))
    assert t.chat_template == open(os.path.join(DIRS["tok-sp-like"], "chat_template.jinja")).read()


def test_import_copies_the_tokenizer_in_and_export_writes_it_back(tmp_path):
    import shutil

    from moejax.checkpoint.hf_export import export_hf
    from moejax.checkpoint.hf_import import import_hf

    hf = tmp_path / "hf"
    shutil.copytree(os.path.join(REPO, "tests", "data", "hf-mixtral-tiny"), hf)
    for name in os.listdir(DIRS["tok-sp-like"]):
        shutil.copyfile(os.path.join(DIRS["tok-sp-like"], name), hf / name)
    rep = import_hf(str(hf), str(tmp_path / "ckpt"))
    assert sorted(rep["tokenizer_files"]) == sorted(os.listdir(DIRS["tok-sp-like"]))
    assert tokenizer_dir(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt" / "tokenizer")
    out = export_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    assert sorted(out["tokenizer_files"]) == sorted(os.listdir(DIRS["tok-sp-like"]))
    for name in os.listdir(DIRS["tok-sp-like"]):  # byte for byte
        assert (tmp_path / "back" / name).read_bytes() == (hf / name).read_bytes(), name
    # reshard and quantize carry it along
    from moejax.checkpoint.quantize import quantize
    from moejax.checkpoint.reshard import reshard
    from moejax.parallel.mesh import MeshShape

    reshard(str(tmp_path / "ckpt"), str(tmp_path / "resharded"), MeshShape(1, 2, 2, 1))
    quantize(str(tmp_path / "resharded"), str(tmp_path / "int8"))
    for ckpt in ("resharded", "int8"):
        assert sorted(os.listdir(tokenizer_dir(str(tmp_path / ckpt)))) == sorted(os.listdir(DIRS["tok-sp-like"]))


def test_training_text_is_read_through_the_tokenizer(tmp_path):
    from moejax.training import data

    path = tmp_path / "t.txt"
    path.write_text(LONG)
    t = HFTokenizer(DIRS["shakespeare-bpe"])
    ids = data.read_tokens(str(path), t)
    assert ids.dtype == "int32" and ids.tolist() == t.encode(LONG, add_special_tokens=False)  # no BOS added
    assert data.read_tokens(str(path), ByteTokenizer(256)).tolist() == list(LONG.encode())
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        data.read_tokens(str(path), t)


def test_infer_reads_and_writes_text_with_the_tokenizer():
    from helpers import run_script

    r = run_script("infer.py", "--config", "configs/shakespeare-bpe.yaml", "--tokenizer", DIRS["shakespeare-bpe"],
                   "--prompt", "ROMEO:", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    t = HFTokenizer(DIRS["shakespeare-bpe"])
    assert rep["prompt_tokens"] == len(t.encode("ROMEO:")) == 3 and t.encode("ROMEO:")[0] == t.bos_id  # <|bos|> ROMEO :
    assert rep["generated_text"] == [t.decode(rep["generated_ids"][0])] and rep["tokenizer"] == DIRS["shakespeare-bpe"]
    r = run_script("infer.py", "--config", "configs/tiny.yaml", "--tokenizer", DIRS["shakespeare-bpe"])
    assert r.returncode == 2 and "more than the model's vocabulary of 256" in r.stderr and "Traceback" not in r.stderr
