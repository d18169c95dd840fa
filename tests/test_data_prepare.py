"""The shared data layer: split, templates, encoding, the HDF5 layout and `sparse-lora data prepare`.

Templates are checked against lm-eval's own task definitions (installed), the encoding against
`cszoo data_preprocess` (finetuning mode) on the same JSONL (`modelzoo` marker).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from modelzoo_ext.data.encode import encode_example
from modelzoo_ext.data.hdf5 import SampleDataset
from modelzoo_ext.data.prepare import jsonl_examples, prepare
from modelzoo_ext.data.split import split_of
from modelzoo_ext.data.templates import TEMPLATE_VERSION, example_key, render
from modelzoo_ext.errors import UserError

ROWS = [
    {"prompt": "Question: what is 2 plus 2?\nAnswer:", "completion": " 4"},
    {"prompt": "Café au lait — naïve façade?\nAnswer:", "completion": " oui, très"},
    {
        "prompt": "Translate to French: the cat sleeps on the mat\n",
        "completion": " le chat dort sur le tapis",
    },
    {"prompt": "x", "completion": " y"},  # too short (< 10 tokens): skipped
    {"prompt": "word " * 60, "completion": " end"},  # too long for msl 32: skipped
] + [
    {"prompt": f"Question: what is {i} times {i + 1}?\nAnswer:", "completion": f" {i * (i + 1)}"}
    for i in range(12)
]


@pytest.fixture()
def jsonl(tmp_path) -> Path:
    path = tmp_path / "in" / "data.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS))
    return path


def _tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


# ----------------------------------------------------------------------------- split
def test_split_is_a_deterministic_partition():
    keys = [f"example-{i}" for i in range(4000)]
    sides = [split_of(k, 0.25) for k in keys]
    assert sides == [split_of(k, 0.25) for k in keys]  # same answer every time
    assert set(sides) == {"train", "heldout"}
    assert 0.22 < sides.count("heldout") / len(keys) < 0.28
    # growing the held-out fraction only moves examples into the held-out part
    assert all(split_of(k, 0.5) == "heldout" for k, s in zip(keys, sides, strict=True) if s == "heldout")
    assert [split_of(k, 0.25, salt="other") for k in keys] != sides
    with pytest.raises(UserError):
        split_of("a", 1.5)


# ----------------------------------------------------------------------------- templates
def _lm_eval_task_yaml(relative: str) -> dict:
    import lm_eval

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((Path(lm_eval.__file__).parent / "tasks" / relative).read_text(), Loader=Loader)


def test_templates_render_what_lm_eval_scores():
    """Prompt and completion equal lm-eval 0.4.9.1's doc_to_text, choice/target and target_delimiter."""
    import jinja2
    from lm_eval.tasks.hellaswag.utils import preprocess

    env = jinja2.Environment()
    boolq_cfg = _lm_eval_task_yaml("super_glue/boolq/default.yaml")
    for answer in (True, False):
        row = {"question": "is the sky blue", "passage": "The sky [title] is blue.", "answer": answer}
        ex = render("boolq", row)
        assert ex.prompt == env.from_string(boolq_cfg["doc_to_text"]).render(**row)
        assert ex.completion == " " + boolq_cfg["doc_to_choice"][int(answer)]
    gsm_cfg = _lm_eval_task_yaml("gsm8k/gsm8k.yaml")
    row = {"question": "Tom has 3 apples. How many?", "answer": "He has 3.\n#### 3"}
    ex = render("gsm8k", row)
    assert ex.prompt == env.from_string(gsm_cfg["doc_to_text"]).render(**row)
    assert ex.completion == " " + env.from_string(gsm_cfg["doc_to_target"]).render(**row)
    row = {
        "ind": 7,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof. [title]",
        "ctx_b": "he",
        "endings": ["a [step] b", "starts  pulling up roofing."],
        "label": "1",
    }
    ex = render("hellaswag", row)
    assert ex.prompt == preprocess(
        row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize()
    )
    assert ex.completion == " " + preprocess(row["endings"][1])
    assert TEMPLATE_VERSION.startswith("lm-eval-0.4.9.1")


def test_example_key_ignores_the_answer():
    """Evaluation rows (which may name the answer differently) get the same key as training rows."""
    row = {"question": "q", "passage": "p", "answer": True}
    assert example_key("boolq", row) == example_key("boolq", {"question": "q", "passage": "p", "label": 1})
    assert render("boolq", row).key == example_key("boolq", row)


# ----------------------------------------------------------------------------- encoding
def test_encoding_masks_exactly_the_completion_and_eos(tokenizer_dir):
    tok = _tokenizer(tokenizer_dir)
    prompt, completion = "The sky is blue.\nQuestion: is the sky blue?\nAnswer:", " yes"
    sample = encode_example(tok, prompt, completion, max_seq_length=40)
    input_ids, loss_mask, labels = sample
    full = tok(prompt + completion + tok.eos_token)["input_ids"]
    n = len(full) - 1
    assert sample.dtype == np.int32 and sample.shape == (3, 40)
    assert input_ids[:n].tolist() == full[:-1] and labels[:n].tolist() == full[1:]
    # the labels under the loss are exactly the completion's token and EOS
    assert labels[loss_mask == 1].tolist() == [tok.convert_tokens_to_ids("▁yes"), tok.eos_token_id]
    assert loss_mask[n:].sum() == 0 and set(input_ids[n:].tolist()) == {tok.pad_token_id}
    assert encode_example(tok, "word " * 50, " x", max_seq_length=16) is None


# ----------------------------------------------------------------------------- prepare
def test_prepare_is_deterministic_and_records_provenance(tmp_path, jsonl, tokenizer_dir):
    outs = []
    for name in ("a", "b"):
        params = prepare(
            jsonl_examples(jsonl),
            tokenizer_dir=tokenizer_dir,
            max_seq_length=32,
            out_dir=tmp_path / name,
            split="all",
            progress=False,
        )
        outs.append(tmp_path / name)
    files = [sorted(o.glob("*.h5")) for o in outs]
    assert [f.name for f in files[0]] == ["output_chunk_0_0.h5"]
    assert files[0][0].read_bytes() == files[1][0].read_bytes()
    assert params["counts"] == {
        "rows": 17,
        "in_split": 17,
        "written": 15,
        "skipped_too_long": 1,
        "skipped_too_short": 1,
    }
    assert params["template_version"] == TEMPLATE_VERSION
    with h5py.File(files[0][0]) as f:
        assert f["data"].shape == (15, 3, 32) and f["data"].dtype == np.int32 and f.attrs["n_examples"] == 15
    data = SampleDataset(outs[0])
    assert len(data) == 15 and data.max_seq_length == 32
    assert int(sum(data[i][1].sum() for i in range(15))) == params["loss_tokens"]


def test_train_and_heldout_never_overlap(tmp_path, jsonl, tokenizer_dir):
    kwargs = dict(tokenizer_dir=tokenizer_dir, max_seq_length=32, held_out_fraction=0.4, progress=False)
    train = prepare(jsonl_examples(jsonl), out_dir=tmp_path / "train", split="train", **kwargs)
    held = prepare(jsonl_examples(jsonl), out_dir=tmp_path / "held", split="heldout", **kwargs)
    assert train["counts"]["in_split"] + held["counts"]["in_split"] == len(ROWS)
    rows = lambda d: {tuple(SampleDataset(d)[i][0]) for i in range(len(SampleDataset(d)))}  # noqa: E731
    assert not rows(tmp_path / "train") & rows(tmp_path / "held")


@pytest.mark.parametrize("salt", [None, "another-salt"])
def test_prepare_bundled_boolq_heldout(tmp_path, tokenizer_dir, salt):
    """A real task through the CLI: BoolQ's bundled validation rows, held-out part of the salted split."""
    from modelzoo_ext.cli import main
    from modelzoo_ext.data.protocol import split_rows
    from modelzoo_ext.data.split import DEFAULT_SALT

    out = tmp_path / "boolq"
    argv = ["data", "prepare", "--task", "boolq", "--tokenizer", str(tokenizer_dir), "--max-seq-length", "64",
            "--out", str(out), "--split", "heldout", "--held-out-fraction", "0.02"]  # fmt: skip
    assert main(argv + (["--split-salt", salt] if salt else [])) == 0
    params = json.loads((out / "data_params.json").read_text())
    assert params["task"] == "boolq" and params["counts"]["rows"] == 3270
    assert params["split_salt"] == (salt or DEFAULT_SALT)
    expected = [row for row in split_rows("boolq", "validation", "bundled")
                if split_of(example_key("boolq", row), 0.02, salt or DEFAULT_SALT) == "heldout"]  # fmt: skip
    assert params["counts"]["in_split"] == len(expected) > 0


def test_cli_errors_exit_2_without_output(tmp_path, tokenizer_dir):
    """A missing input file: exit status 2, one-line error, nothing under --out."""
    out = tmp_path / "out"
    code = (
        "import argparse, sys; from modelzoo_ext.cli import main as _m\n"
        "from modelzoo_ext.data.cli import register; from modelzoo_ext.errors import UserError\n"
        "p = argparse.ArgumentParser(); s = p.add_subparsers(dest='c'); register(s, {})\n"
        "a = p.parse_args(sys.argv[1:])\n"
        "try: sys.exit(a.func(a))\n"
        "except UserError as e: print('error:', e, file=sys.stderr); sys.exit(2)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "data", "prepare", "--input", str(tmp_path / "missing.jsonl"),
         "--tokenizer", str(tokenizer_dir), "--max-seq-length", "32", "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "input file not found" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.modelzoo
def test_matches_cszoo_data_preprocess(tmp_path, jsonl, tokenizer_dir):
    """The same JSONL through `cszoo data_preprocess` (finetuning, sep_token null, no ftfy) gives identical samples."""
    config = {
        "setup": {"data": {"source": str(jsonl.parent), "type": "local"}, "output_dir": str(tmp_path / "cszoo"),
                  "processes": 1, "mode": "finetuning"},
        "processing": {
            "huggingface_tokenizer": str(tokenizer_dir), "max_seq_length": 32,
            "read_hook": "cerebras.modelzoo.data_preparation.data_preprocessing.hooks:prompt_completion_text_read_hook",
            "read_hook_kwargs": {"prompt_key": "prompt", "completion_key": "completion"},
            "shuffle": False, "use_ftfy": False, "write_in_batch": True, "resume_from_checkpoint": False,
        },
        "dataset": {"sep_token": None},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    cszoo = Path(sys.executable).with_name("cszoo")
    proc = subprocess.run(
        [str(cszoo), "data_preprocess", "run", "--config", str(tmp_path / "cfg.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    prepare(
        jsonl_examples(jsonl),
        tokenizer_dir=tokenizer_dir,
        max_seq_length=32,
        out_dir=tmp_path / "ours",
        split="all",
        progress=False,
    )
    theirs, ours = SampleDataset(tmp_path / "cszoo"), SampleDataset(tmp_path / "ours")
    assert len(theirs) == len(ours) == 15
    for i in range(len(ours)):
        np.testing.assert_array_equal(theirs[i], ours[i])


def test_official_protocol_reads_the_named_splits_of_a_directory(tmp_path, tokenizer_dir, capsys):
    """`--protocol official` from a directory in the hub datasets' schema: training = its train split,
    held out = its whole validation split; their example keys never overlap."""
    from modelzoo_ext.cli import main
    from modelzoo_ext.data.prepare import key_digest, read_example_keys
    from modelzoo_ext.data.protocol import split_rows

    rows = list(split_rows("boolq", "validation", "bundled"))[:40]
    (tmp_path / "hub" / "boolq").mkdir(parents=True)
    for split, part in (("validation", rows[:15]), ("train", rows[15:])):
        (tmp_path / "hub" / "boolq" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in part)
        )
    keys = {}
    for split in ("train", "heldout"):
        out = tmp_path / split
        argv = ["data", "prepare", "--task", "boolq", "--source", str(tmp_path / "hub"), "--tokenizer",
                str(tokenizer_dir), "--max-seq-length", "1024", "--split", split, "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        params = json.loads((out / "data_params.json").read_text())
        assert params["protocol"]["protocol"] == "official" and params["split"] == split
        assert params["held_out_fraction"] is None and params["split_salt"] is None
        keys[split] = set(read_example_keys(out))
    assert keys["train"] == {key_digest(example_key("boolq", r)) for r in rows[15:]}
    assert keys["heldout"] == {key_digest(example_key("boolq", r)) for r in rows[:15]}
    bad = ["data", "prepare", "--task", "boolq", "--source", "bundled", "--protocol", "official", "--tokenizer",
           str(tokenizer_dir), "--max-seq-length", "64", "--out", str(tmp_path / "x")]  # fmt: skip
    assert main(bad) == 2  # the offline copies hold no training split
    assert "holds only its evaluation split" in capsys.readouterr().err and not (tmp_path / "x").exists()
