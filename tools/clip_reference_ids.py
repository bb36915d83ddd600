#!/usr/bin/env python3
"""Reference token ids for the CLIP tokenizer tests: testdata/tokenizer/clip-ids.jsonl.

Runs OpenAI's own CLIP tokenizer (clip/simple_tokenizer.py of a CLIP checkout, given by
--clip-src; not part of this repository) on each prompt of testdata/tokenizer/prompts.jsonl
with the project's merge list (../shared/data/clip). Debian has no ftfy; the stub this script
installs does what ftfy.fix_text does to the test prompts (NFC, curly quotes, Latin
ligatures, full-width forms, control characters; see stages/tokenizer/clip.go), so the ids
are those of CLIP with that subset of ftfy.

  /usr/bin/python3 tools/clip_reference_ids.py --clip-src /path/to/CLIP
"""
import argparse
import importlib.util
import json
import os
import sys
import types
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUOTES = {"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
          "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
          "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
          "\ufb05": "ſt", "\ufb06": "st"}


def fix_text(s):
    for k, v in QUOTES.items():
        s = s.replace(k, v)
    out = []
    for ch in s:
        o = ord(ch)
        if 0xFF01 <= o <= 0xFF5E:
            out.append(chr(o - 0xFEE0))
        elif o == 0x3000:
            out.append(" ")
        elif ch in "\t\n\r":
            out.append(ch)
        elif unicodedata.category(ch) == "Cc":
            continue
        else:
            out.append(ch)
    return unicodedata.normalize("NFC", "".join(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip-src", required=True, help="a checkout of github.com/openai/CLIP")
    args = ap.parse_args()
    sys.modules["ftfy"] = types.SimpleNamespace(fix_text=fix_text)
    spec = importlib.util.spec_from_file_location("simple_tokenizer", os.path.join(args.clip_src, "clip", "simple_tokenizer.py"))
    st = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(st)
    tok = st.SimpleTokenizer(os.path.join(ROOT, "testdata", "tokenizer", "clip", "bpe_simple_vocab_16e6.txt.gz"))
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    with open(os.path.join(ROOT, "testdata", "tokenizer", "prompts.jsonl")) as f, \
            open(os.path.join(ROOT, "testdata", "tokenizer", "clip-ids.jsonl"), "w") as out:
        for line in f:
            p = json.loads(line)
            ids = tok.encode(p)
            # the pipelines' tokenizer(..., padding="max_length", max_length=77, truncation=True)
            enc = [sot] + ids[:75] + [eot]
            enc += [eot] * (77 - len(enc))
            out.write(json.dumps({"prompt": p, "tokens": ids, "input_ids": enc}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
