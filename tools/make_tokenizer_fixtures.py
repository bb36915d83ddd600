#!/usr/bin/env python3
"""SentencePiece fixtures for the tokenizer tests, with Google's reference implementation
(Debian's python3-sentencepiece; not part of this repository):

  testdata/tokenizer/t5-like/spiece.model      unigram, nmt_nfkc, T5's special ids
                                               (pad 0, eos 1, unk 2, no bos), 800 pieces
  testdata/tokenizer/t5-bytes/spiece.model     the same with byte_fallback
  testdata/tokenizer/spm-ids.jsonl             each prompt of prompts.jsonl: the reference's
                                               ids and pieces for both models

The training text is this repository's own documentation and tools, so the models are the
project's. Run from the repository root:  /usr/bin/python3 tools/make_tokenizer_fixtures.py
"""
import glob
import io
import json
import os

import sentencepiece as spm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "testdata", "tokenizer")


def corpus():
    text = []
    for pattern in ("README.md", "models/README.md", "testdata/*/README.md", "tools/*.py"):
        for p in sorted(glob.glob(os.path.join(ROOT, pattern))):
            with open(p, encoding="utf-8") as f:
                text.extend(line.strip() for line in f if line.strip())
    with open(os.path.join(OUT, "prompts.jsonl"), encoding="utf-8") as f:
        text.extend(json.loads(line).replace("\n", " ") for line in f)
    return text


def train(name, byte_fallback):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=model, vocab_size=800,
                                   model_type="unigram", normalization_rule_name="nmt_nfkc",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=0.9995,
                                   byte_fallback=byte_fallback, minloglevel=2)
    with open(os.path.join(d, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def main():
    models = {"t5-like": train("t5-like", False), "t5-bytes": train("t5-bytes", True)}
    with open(os.path.join(OUT, "prompts.jsonl"), encoding="utf-8") as f, \
            open(os.path.join(OUT, "spm-ids.jsonl"), "w", encoding="utf-8") as out:
        for line in f:
            p = json.loads(line)
            rec = {"prompt": p}
            for name, sp in models.items():
                rec[name] = {"ids": sp.encode(p), "pieces": sp.encode(p, out_type=str)}
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
