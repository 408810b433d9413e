"""Real English text for calibration and evaluation, from files the ``gensim`` package ships.

- Calibration: ``lee_background.cor`` (300 news articles, ~360 kB; Lee et al. corpus).
- Evaluation: the English Wikipedia excerpt ``enwiki-latest-pages-articles1...shortened.bz2``
  (article wikitext with the markup stripped by gensim's ``filter_wiki``).

The two never overlap, so perplexity is measured on text the calibration never saw.
"""

from __future__ import annotations

import bz2
import functools
import re

import torch

__all__ = ["calibration_text", "eval_text", "wiki_calibration_text", "CALIBRATION_SOURCES", "calibration_tokens", "eval_windows", "tokenize_text"]

_CALIBRATION_FILE = "lee_background.cor"
_EVAL_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _datapath(name: str) -> str:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:
        raise ImportError("the packaged texts come from gensim: pip install 'hadacore[hf]'") from e
    return datapath(name)


@functools.lru_cache(maxsize=1)
def calibration_text() -> str:
    """The calibration corpus: 300 news articles, one per line."""
    with open(_datapath(_CALIBRATION_FILE), encoding="utf-8") as f:
        return f.read()


# The evaluation text: the first _EVAL_ARTICLES Wikipedia articles of at least _EVAL_MIN_CHARS.
_EVAL_ARTICLES = 8
_EVAL_MIN_CHARS = 5000


def _wiki_articles():
    """The Wikipedia file's articles in order, markup stripped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(_datapath(_EVAL_FILE), "rb") as f:
        for _title, text, _pid in extract_pages(f, filter_namespaces=("0",)):
            text = filter_wiki(text)
            text = re.sub(r"'{2,}", "", text)  # bold/italic quotes filter_wiki leaves
            yield re.sub(r"\n{3,}", "\n\n", text).strip()


@functools.lru_cache(maxsize=4)
def eval_text(articles: int = _EVAL_ARTICLES, min_chars: int = _EVAL_MIN_CHARS) -> str:
    """The first ``articles`` Wikipedia articles of at least ``min_chars`` characters, markup stripped."""
    out = []
    for text in _wiki_articles():
        if len(text) >= min_chars:
            out.append(text)
        if len(out) == articles:
            break
    return "\n\n".join(out)


@functools.lru_cache(maxsize=1)
def wiki_calibration_text(min_chars: int = 2000) -> str:
    """Wikipedia articles of the evaluation file that come *after* every article of
    :func:`eval_text` (default arguments): same distribution, disjoint text."""
    held_out = set(eval_text().split("\n\n"))  # paragraphs
    eval_left = _EVAL_ARTICLES  # eval_text()'s articles still ahead in the file
    out = []
    for text in _wiki_articles():
        if eval_left:
            eval_left -= len(text) >= _EVAL_MIN_CHARS
            continue
        if len(text) >= min_chars:
            out.append(text)
    if not out:
        raise ValueError("the Wikipedia file has no articles after the evaluation ones")
    joined = "\n\n".join(out)
    if any(p in joined for p in held_out if len(p) > 200):
        raise RuntimeError("Wikipedia calibration text overlaps the evaluation text")
    return joined


#: ``calibration_tokens(source=...)``: the packaged calibration texts by name.
CALIBRATION_SOURCES = {"lee": calibration_text, "wiki": wiki_calibration_text}


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_tokens(tokenizer, *, samples: int, seqlen: int, seed: int = 0, text: str | list[str] | None = None) -> torch.Tensor:
    """``[samples, seqlen]`` token windows at seeded random offsets of the calibration text
    (or of ``text``: one string or a list of documents joined by blank lines)."""
    if text is None:
        text = calibration_text()
    elif not isinstance(text, str):
        text = "\n\n".join(text)
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < seqlen + 1:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, *, seqlen: int = 512, windows: int = 16) -> torch.Tensor:
    """``[windows, seqlen]``: the first non-overlapping windows of the evaluation text (fixed)."""
    ids = tokenize_text(tokenizer, eval_text())
    n = min(windows, ids.numel() // seqlen)
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)
