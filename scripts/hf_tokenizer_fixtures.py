#!/usr/bin/env python
"""Tokenizer and chat-template expectations computed by Hugging Face transformers and tokenizers (the
`.[hf]` extra: pip install -e '.[hf]'). Not run in CI: CI reads what this wrote.

    python scripts/hf_tokenizer_fixtures.py [--out tests/data/tokenizer-fixtures]

Writes, under --out:
  tok-sp-like/      a second tokenizer, unlike data/shakespeare-bpe: SentencePiece-style (Metaspace
                    "▁" pre-tokenizer, prepend_scheme "first"; BPE with byte_fallback over <0x00>..<0xFF>
                    and <unk>; Llama's Replace/ByteFallback/Fuse/Strip decoder), specials <unk> <s> </s>
                    <|im_start|> <|im_end|> (ids 0..4), bos <s>, eos <|im_end|>, no pad token,
                    generation_config eos_token_id a single int, and a Qwen-style ChatML template
                    (default system prompt, content a string or a list of text parts) in
                    chat_template.jinja beside tokenizer_config.json. Trained on the first 6 KB of
                    data/tinyshakespeare.txt, so emoji and CJK fall back to bytes.
  expected.json     for data/shakespeare-bpe and tok-sp-like (keys "shakespeare-bpe", "tok-sp-like"):
    specials         bos/eos/pad/unk token and id, vocab_size (len(tokenizer)), added_tokens
                     {id: [content, special]}, generation_config's eos_token_id as written and as a list
    id_tokens        convert_ids_to_tokens of a few ids: [[id, token string], ...]
    encode           per TEXTS entry: text, ids_special (encode, add_special_tokens=True), ids_plain
                     (False), decode_skip / decode_keep (decode of ids_special, skip_special_tokens
                     True / False)
    chat             per CHATS entry: name, messages, add_generation_prompt, text
                     (apply_chat_template(tokenize=False)) and ids (text encoded with
                     add_special_tokens=False, as vLLM does; checked equal to apply_chat_template's
                     own tokenize=True ids). A list of text parts: with a string-only template
                     (content_format "string") transformers' rendering raises (recorded in
                     "transformers_error"); text/ids are then vLLM's: the parts' text joined with "\\n"
                     before rendering. With a template that loops over parts ("openai"), the list is
                     rendered as is.
  versions          transformers and tokenizers that computed it.

Deterministic: the same inputs give the same bytes (the trainer breaks count ties by the pair itself).
"""

import argparse
import json
import os
import shutil

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
SP_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] %}{%- set rest = messages[1:] %}
{%- else %}
{%- set system = 'You are a helpful assistant.' %}{%- set rest = messages %}
{%- endif %}
{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}
{%- for message in rest %}
{{- '<|im_start|>' + message['role'] + '\\n' }}
{%- if message['content'] is string %}{{- message['content'] }}
{%- else %}{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
CONTENT_FORMAT = {"shakespeare-bpe": "string", "tok-sp-like": "openai"}  # what vLLM detects

TEXTS = [
    "ROMEO: But, soft! what light through yonder window breaks? 42 times, 3.14.",
    "emoji 👋🏽 family 👨\u200d👩\u200d👧\u200d👦 flag 🇯🇵 heart ❤️ end",
    "日本語のテキスト、中文句子。한국어",
    "  two leading spaces\tand\ttabs\nline two\n\n\r\nlast line ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "a<|bos|>b<|pad|>c <s>d</s> <unk>e",
    "café naïve cafe\u0301 Ωμέγα",
    "",
]
_PARTS = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]
CHATS = [
    ("system_user", [{"role": "system", "content": "Answer in verse."},
                     {"role": "user", "content": "Who is there?"}], True),
    ("multi_turn", [{"role": "user", "content": "Good morrow."},
                    {"role": "assistant", "content": "Good morrow, sir."},
                    {"role": "user", "content": "How fares the king?"}], True),
    ("text_parts", [{"role": "user", "content": _PARTS}], True),
    ("unicode", [{"role": "user", "content": "Say 👨\u200d👩\u200d👧\u200d👦 and 日本語 and café\tnow"}], True),
    ("empty_content", [{"role": "system", "content": ""}, {"role": "user", "content": ""}], True),
    ("no_generation_prompt", [{"role": "user", "content": "Hail!"},
                              {"role": "assistant", "content": "All hail."}], False),
]


def build_sp_like(out: str) -> None:
    """Train tok-sp-like on 6 KB of Shakespeare and write it with its template as chat_template.jinja."""
    text = open(os.path.join(REPO, "data", "tinyshakespeare.txt"), encoding="utf-8").read()[:6000]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=2, special_tokens=SP_SPECIALS, show_progress=False)
    tok.train_from_iterator([text], trainer)
    # the byte tokens go right after the specials, as ordinary vocabulary (byte fallback's targets)
    learned = json.loads(tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SP_SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m) for m in learned["merges"]]
    sp = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    sp.add_special_tokens(SP_SPECIALS)
    sp.pre_tokenizer = tok.pre_tokenizer
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                                      special_tokens=[("<s>", 1)])
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(sp.to_str(pretty=True) + "\n")
    with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(SP_TEMPLATE)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
              "unk_token": "<unk>", "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    for name, obj in (("tokenizer_config.json", config), ("generation_config.json", {"bos_token_id": 1,
                                                                                       "eos_token_id": 4})):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")


def _joined(messages):
    """vLLM's "string" content format: a list of text parts becomes their text joined with newlines."""
    return [{**m, "content": "\n".join(p["text"] for p in m["content"] if p["type"] == "text")}
            if isinstance(m["content"], list) else m for m in messages]


def expectations(path: str, name: str) -> dict:
    tok = transformers.AutoTokenizer.from_pretrained(path)
    gen = json.load(open(os.path.join(path, "generation_config.json")))
    eos = gen["eos_token_id"]
    specials = {"vocab_size": len(tok), "generation_eos_token_id": eos,
                "eos_token_ids": eos if isinstance(eos, list) else [eos],
                "added_tokens": {str(i): [t.content, t.special] for i, t in sorted(tok.added_tokens_decoder.items())}}
    for k in ("bos", "eos", "pad", "unk"):
        specials[f"{k}_token"], specials[f"{k}_token_id"] = getattr(tok, f"{k}_token"), getattr(tok, f"{k}_token_id")
    probe = sorted({0, 1, 2, 3, 4, 5, 100, 200, 203, 225, 261, 300, len(tok) // 2, len(tok) - 1})
    enc = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=True)
        enc.append({"text": text, "ids_special": ids, "ids_plain": tok.encode(text, add_special_tokens=False),
                    "decode_skip": tok.decode(ids, skip_special_tokens=True),
                    "decode_keep": tok.decode(ids, skip_special_tokens=False)})
    chats = []
    for cname, messages, gen_prompt in CHATS:
        row = {"name": cname, "messages": messages, "add_generation_prompt": gen_prompt}
        rendered = messages
        if CONTENT_FORMAT[name] == "string" and any(isinstance(m["content"], list) for m in messages):
            try:
                tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
                raise AssertionError(f"{name}: the string-only template rendered a list of parts")
            except TypeError as e:
                row["transformers_error"] = f"{type(e).__name__}: {e}"
            rendered = _joined(messages)
            row["rendered_messages"] = rendered
        row["text"] = tok.apply_chat_template(rendered, tokenize=False, add_generation_prompt=gen_prompt)
        row["ids"] = tok.encode(row["text"], add_special_tokens=False)
        own = tok.apply_chat_template(rendered, tokenize=True, add_generation_prompt=gen_prompt)["input_ids"]
        assert own == row["ids"], (name, cname, own, row["ids"])
        chats.append(row)
    return {"path": os.path.relpath(path, REPO), "content_format": CONTENT_FORMAT[name], "specials": specials,
            "id_tokens": [[i, t] for i, t in zip(probe, tok.convert_ids_to_tokens(probe))],
            "encode": enc, "chat": chats}


def _dump(obj, indent: str = "") -> str:
    """JSON, one line for a list or mapping of scalars (ids, [id, token], a message), nested ones indented."""
    flat = json.dumps(obj, ensure_ascii=False)
    if not isinstance(obj, (list, dict)) or all(not isinstance(v, (list, dict))
                                                 for v in (obj.values() if isinstance(obj, dict) else obj)):
        return flat
    inner = indent + " "
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_dump(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    return "[\n" + ",\n".join(inner + _dump(v, inner) for v in obj) + "\n" + indent + "]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "tokenizer-fixtures"))
    a = p.parse_args()
    sp = os.path.join(a.out, "tok-sp-like")
    build_sp_like(sp)
    data = {"versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
            "shakespeare-bpe": expectations(os.path.join(REPO, "data", "shakespeare-bpe"), "shakespeare-bpe"),
            "tok-sp-like": expectations(sp, "tok-sp-like")}
    text = _dump(data)
    with open(os.path.join(a.out, "expected.json"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {a.out}: expected.json ({len(text)} chars), tok-sp-like/ "
          f"(vocab {data['tok-sp-like']['specials']['vocab_size']})")


if __name__ == "__main__":
    main()
