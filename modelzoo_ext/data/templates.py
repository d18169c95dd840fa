"""Versioned prompt templates: one set for both backends, identical to lm-eval's task prompts.

Training text must look exactly like the text lm-eval scores at evaluation time, so each
template copies lm-eval 0.4.9.1's `doc_to_text`, its target and its `target_delimiter` (" "):

    boolq      "{passage}\nQuestion: {question}?\nAnswer:"   -> " yes" | " no"
    hellaswag  preprocess("{activity_label}: {ctx_a} {ctx_b.capitalize()}")  -> " " + preprocess(ending[label])
    gsm8k      "Question: {question}\nAnswer:"               -> " " + answer   (with its "#### N" line)

`TEMPLATE_VERSION` is written into every prepared dataset; change it whenever a template changes.
The example key (what the train/held-out split hashes) is built from the example's content,
so duplicates land on the same side and the split does not depend on the order of rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelzoo_ext.errors import UserError

TEMPLATE_VERSION = "lm-eval-0.4.9.1/v1"
TASKS = ("boolq", "hellaswag", "gsm8k")


@dataclass(frozen=True)
class Example:
    """One prompt/completion pair; the loss is taken on the completion only."""

    key: str
    prompt: str
    completion: str


def _boolq(row: dict[str, Any]) -> Example:
    prompt = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    completion = " yes" if row["answer"] else " no"
    return Example(key=example_key("boolq", row), prompt=prompt, completion=completion)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip, '[title]' -> '. ', drop '[...]' tags, collapse double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict[str, Any]) -> Example:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    prompt = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    ending = hellaswag_preprocess(row["endings"][int(row["label"])])
    return Example(key=example_key("hellaswag", row), prompt=prompt, completion=" " + ending)


def _gsm8k(row: dict[str, Any]) -> Example:
    prompt = f"Question: {row['question']}\nAnswer:"
    return Example(key=example_key("gsm8k", row), prompt=prompt, completion=" " + row["answer"])


def example_key(task: str, row: dict[str, Any]) -> str:
    """The key `split_of` hashes: built from the question side only (never the answer field).

    boolq: question + passage; hellaswag: `ind` + context; gsm8k: question. Evaluation code
    calls this on the rows it evaluates to select exactly the held-out part.
    """
    if task == "boolq":
        return f"boolq:{row['question']}\x00{row['passage']}"
    if task == "hellaswag":
        return f"hellaswag:{row['ind']}\x00{row['activity_label']}\x00{row['ctx_a']}\x00{row['ctx_b']}"
    if task == "gsm8k":
        return f"gsm8k:{row['question']}"
    raise UserError(f"unknown task {task!r}", fix=f"use one of {TASKS}")


RENDERERS: dict[str, Callable[[dict[str, Any]], Example]] = {
    "boolq": _boolq,
    "hellaswag": _hellaswag,
    "gsm8k": _gsm8k,
}


def render(task: str, row: dict[str, Any]) -> Example:
    """Apply `task`'s template to one dataset row (fields as in the hub/bundled datasets)."""
    if task not in RENDERERS:
        raise UserError(f"unknown task {task!r}", fix=f"use one of {TASKS}")
    try:
        return RENDERERS[task](row)
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(
            f"a {task} row lacks a field the template needs ({exc!r})",
            where=str({k: str(v)[:40] for k, v in row.items()}),
            fix=f"pass the standard {task} fields",
        ) from exc
