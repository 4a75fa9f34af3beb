#!/usr/bin/env python
"""Train the byte-level BPE tokenizer of data/shakespeare-bpe/ offline, with `tokenizers` only.

    python scripts/train_bpe_tokenizer.py [--out data/shakespeare-bpe] [--vocab-size 2048] [--json]

Trained on data/tinyshakespeare.txt (the text `moejax train` reads by default, moejax/training/data.py).
Writes a directory `transformers.AutoTokenizer.from_pretrained` loads:
  tokenizer.json          ByteLevel pre-tokenizer (add_prefix_space=False) and decoder, BPE (min_frequency
                          2, every byte in the initial alphabet, so no text is unknown); specials
                          <|endoftext|> <|bos|> <|im_start|> <|im_end|> <|pad|> are ids 0..4; the
                          post-processor puts <|bos|> before a single sequence (add_special_tokens=True)
  tokenizer_config.json   PreTrainedTokenizerFast, bos <|bos|>, eos <|endoftext|>, pad <|pad|>, and the
                          ChatML chat template CHAT_TEMPLATE
  generation_config.json  bos, pad and eos_token_id [<|endoftext|>, <|im_end|>] (a chat reply ends at <|im_end|>)

BOS and the chat template: a rendered chat is tokenized with add_special_tokens=False (vLLM's and
transformers' apply_chat_template(tokenize=True) behaviour), so the post-processor adds nothing to it;
the template itself starts with `{{ bos_token }}`, so a chat's ids begin with <|bos|> exactly once, like
a plain prompt encoded with add_special_tokens=True. (Encoding a rendered chat with
add_special_tokens=True would give two <|bos|>, as with Llama 3's tokenizer.)

The template takes string content only (a "string" content format: vLLM joins a list of text parts
with "\\n" before rendering; transformers passes the list through and the template fails on it).

Deterministic: the BPE trainer breaks ties between equal pair counts by the pair itself, and the
files are written with sorted keys, so two runs write identical bytes.
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # set before tokenizers loads

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|bos|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0..4
BOS, EOS, PAD, IM_END = "<|bos|>", "<|endoftext|>", "<|pad|>", "<|im_end|>"
MODEL_MAX_LENGTH = 1024  # configs/shakespeare-bpe.yaml's max_seq_len
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train(text_path: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([text_path], trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1",
                                                       special_tokens=[(BOS, bos)])
    return tok


def write(tok: Tokenizer, out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    assert [ids[t] for t in SPECIALS] == list(range(len(SPECIALS))), ids
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok.to_str(pretty=True) + "\n")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "pad_token": PAD, "model_max_length": MODEL_MAX_LENGTH, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    generation = {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[IM_END]], "pad_token_id": ids[PAD]}
    for name, obj in (("tokenizer_config.json", config), ("generation_config.json", generation)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
    return {"out": out, "vocab_size": tok.get_vocab_size(), "specials": ids,
            "bytes": sum(os.path.getsize(os.path.join(out, n)) for n in sorted(os.listdir(out)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "data", "tinyshakespeare.txt"))
    p.add_argument("--out", default=os.path.join(REPO, "data", "shakespeare-bpe"))
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    a = p.parse_args(argv)
    if a.vocab_size < 256 + len(SPECIALS):
        p.error(f"--vocab-size must be at least {256 + len(SPECIALS)} (the byte alphabet and the specials)")
    summary = write(train(a.data, a.vocab_size), a.out)
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['out']}: vocab {summary['vocab_size']}, specials "
              + " ".join(f"{t}={i}" for t, i in summary["specials"].items()) + f", {summary['bytes']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
