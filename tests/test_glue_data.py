"""GLUE readers: every task's file format from small files written here, the real files in ../shared/data, bad input."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aroma_peft.tasks.glue import GLUE_TASKS, Example, find_split_files, read_split

SHARED_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
QUOTED = 'He said "no" and left "'  # raw quotes, one unbalanced: csv quoting would eat or merge them


def write_tsv(path: Path, rows: list[list[str]], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join("\t".join(r) for r in rows) + "\n"
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def mnli_row(i: int, premise: str, hypothesis: str, labels: list[str]) -> list[str]:
    return [str(i), "31193", f"{i}e", "government", "( ( x ) )", "( y )", "(ROOT x)", "(ROOT y)", premise,
            hypothesis] + labels


# task -> (header-or-None + rows of a GLUE distribution TSV, the Examples they hold)
TSV_CASES = {
    "cola": ([["gj04", "1", "", QUOTED], ["clc95", "0", "*", "Sam was going 'to' go."]],
             [Example(QUOTED, None, 1), Example("Sam was going 'to' go.", None, 0)]),
    "sst2": ([["sentence", "label"], [QUOTED + " ", "0"], ["a charming journey . ", "1"]],
             [Example(QUOTED + " ", None, 0), Example("a charming journey . ", None, 1)]),
    "mrpc": ([["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], ["1", "702876", "702977", QUOTED, "b \"c\""],
              ["0", "1", "2", "x", "y"]],
             [Example(QUOTED, 'b "c"', 1), Example("x", "y", 0)]),
    "qqp": ([["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], ["7", "15", "16", QUOTED, "q?", "1"],
             ["8", "17", "18", "why?", "how?", "0"]],
            [Example(QUOTED, "q?", 1), Example("why?", "how?", 0)]),
    "stsb": ([["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"],
              ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", QUOTED, "A plane.", "5.000"],
              ["1", "main-forums", "answers", "2015", "0002", "none", "none", "x", "y", "0.75"]],
             [Example(QUOTED, "A plane.", 5.0), Example("x", "y", 0.75)]),
    "qnli": ([["index", "question", "sentence", "label"], ["0", QUOTED, "s1", "entailment"],
              ["1", "q2", "s2", "not_entailment"]],
             [Example(QUOTED, "s1", 0), Example("q2", "s2", 1)]),
    "rte": ([["index", "sentence1", "sentence2", "label"], ["0", QUOTED, "h1", "not_entailment"],
             ["1", "p2", "h2", "entailment"]],
            [Example(QUOTED, "h1", 1), Example("p2", "h2", 0)]),
    "mnli": ([MNLI_HEADER + ["label1", "gold_label"], mnli_row(0, QUOTED, "h0", ["neutral", "neutral"]),
              mnli_row(1, "p1", "h1", ["contradiction", "contradiction"]),
              mnli_row(2, "p2", "h2", ["entailment", "entailment"])],
             [Example(QUOTED, "h0", 1), Example("p1", "h1", 2), Example("p2", "h2", 0)]),
}


@pytest.mark.parametrize("task", sorted(TSV_CASES))
def test_read_tsv_every_task(tmp_path, task):
    rows, expected = TSV_CASES[task]
    path = write_tsv(tmp_path / "train.tsv", rows, bom=task == "mrpc")
    assert read_split(task, path) == expected
    assert all(isinstance(e.label, float if task == "stsb" else int) for e in expected)


def test_task_specs():
    assert sorted(GLUE_TASKS) == sorted(TSV_CASES)
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["stsb"].is_regression
    assert GLUE_TASKS["mnli"].num_labels == 3 and GLUE_TASKS["mnli"].label_names == (
        "entailment", "neutral", "contradiction")
    assert GLUE_TASKS["mnli"].eval_splits == ("dev_matched", "dev_mismatched")
    assert all(GLUE_TASKS[t].eval_splits == ("dev",) for t in GLUE_TASKS if t != "mnli")


def test_mnli_dev_has_five_annotator_labels_and_two_splits(tmp_path):
    dev_header = MNLI_HEADER + [f"label{i}" for i in range(1, 6)] + ["gold_label"]
    write_tsv(tmp_path / "MNLI" / "train.tsv", TSV_CASES["mnli"][0])
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv",
              [dev_header, mnli_row(0, "pm", "hm", ["neutral"] * 4 + ["entailment", "neutral"])])
    write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv",
              [dev_header, mnli_row(0, "pmm", QUOTED, ["contradiction"] * 6)])
    files = find_split_files("mnli", tmp_path)
    assert files == {"train": tmp_path / "MNLI" / "train.tsv", "dev_matched": tmp_path / "MNLI" / "dev_matched.tsv",
                     "dev_mismatched": tmp_path / "MNLI" / "dev_mismatched.tsv"}
    assert read_split("mnli", files["dev_matched"]) == [Example("pm", "hm", 1)]
    assert read_split("mnli", files["dev_mismatched"]) == [Example("pmm", QUOTED, 2)]


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_bytes(b"sentence\tlabel\r\nfine .\t1\r\n")
    assert read_split("sst2", path) == [Example("fine .", None, 1)]


def test_read_parquet_rte(tmp_path):
    table = pa.table({"sentence1": [QUOTED, "p2"], "sentence2": ["h1", "h2"], "label": [0, 1],
                      "idx": pa.array([0, 1], pa.int32())})
    pq.write_table(table, tmp_path / "validation.parquet")
    assert read_split("rte", tmp_path / "validation.parquet") == [Example(QUOTED, "h1", 0), Example("p2", "h2", 1)]


def test_read_parquet_stsb_and_qnli(tmp_path):
    pq.write_table(pa.table({"sentence1": ["a"], "sentence2": ["b"], "label": [3.2], "idx": [0]}),
                   tmp_path / "s.parquet")
    pq.write_table(pa.table({"question": ["q"], "sentence": ["s"], "label": [1], "idx": [0]}), tmp_path / "q.parquet")
    assert read_split("stsb", tmp_path / "s.parquet") == [Example("a", "b", 3.2)]
    assert read_split("qnli", tmp_path / "q.parquet") == [Example("q", "s", 1)]


def test_read_jsonl_and_json_list(tmp_path):
    rows = [{"premise": QUOTED, "hypothesis": "h", "label": 2, "idx": 0},
            {"premise": "p", "hypothesis": "h2", "label": "neutral", "idx": 1}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "m.json").write_text(json.dumps(rows))
    expected = [Example(QUOTED, "h", 2), Example("p", "h2", 1)]
    assert read_split("mnli", tmp_path / "m.jsonl") == expected
    assert read_split("mnli", tmp_path / "m.json") == expected
    (tmp_path / "c.jsonl").write_text(json.dumps({"sentence": "ok .", "label": 0, "idx": 0}))
    assert read_split("cola", tmp_path / "c.jsonl") == [Example("ok .", None, 0)]


def test_find_split_files_layouts(tmp_path):
    write_tsv(tmp_path / "train.tsv", TSV_CASES["rte"][0])
    write_tsv(tmp_path / "dev.tsv", TSV_CASES["rte"][0])
    assert find_split_files("rte", tmp_path) == {"train": tmp_path / "train.tsv", "dev": tmp_path / "dev.tsv"}
    glue = tmp_path / "glue_data"
    write_tsv(glue / "SST-2" / "train.tsv", TSV_CASES["sst2"][0])
    write_tsv(glue / "SST-2" / "dev.tsv", TSV_CASES["sst2"][0])
    assert find_split_files("sst2", glue) == {"train": glue / "SST-2" / "train.tsv", "dev": glue / "SST-2" / "dev.tsv"}
    raw = glue / "cola" / "cola_public" / "raw"  # the CoLA public release, beside SST-2
    for name in ("in_domain_train.tsv", "in_domain_dev.tsv", "out_of_domain_dev.tsv"):
        write_tsv(raw / name, TSV_CASES["cola"][0])
    files = find_split_files("cola", glue)
    assert files == {"train": raw / "in_domain_train.tsv",
                     "dev": (raw / "in_domain_dev.tsv", raw / "out_of_domain_dev.tsv")}
    assert read_split("cola", files["dev"]) == TSV_CASES["cola"][1] * 2


@pytest.mark.parametrize("task, folder, files, rows", [
    ("mrpc", "mrpc", {"train": "train.tsv", "dev": "dev.tsv"}, (3668, 408)),
    ("rte", "rte", {"train": "train.parquet", "dev": "validation.parquet"}, (2490, 277)),
    ("cola", "cola", {"train": "cola_public/raw/in_domain_train.tsv",
                      "dev": ("cola_public/raw/in_domain_dev.tsv", "cola_public/raw/out_of_domain_dev.tsv")},
     (8551, 1043)),
    ("sst2", "sst2", {"train": "train_full.tsv", "dev": "dev.tsv"}, (67349, 872)),
])
def test_real_glue_files(task, folder, files, rows):
    base = SHARED_GLUE / folder
    expected = {s: base / f if isinstance(f, str) else tuple(base / p for p in f) for s, f in files.items()}
    assert find_split_files(task, SHARED_GLUE) == expected  # the glue root finds the task's folder
    assert find_split_files(task, base) == expected
    train, dev = (read_split(task, expected[s]) for s in ("train", "dev"))
    assert (len(train), len(dev)) == rows
    assert {e.label for e in train} == {e.label for e in dev} == {0, 1}
    assert all(isinstance(e.text_a, str) and e.text_a for e in train + dev)
    assert all((e.text_b is None) == (task in ("cola", "sst2")) for e in train + dev)


def test_real_mrpc_keeps_quotes_and_drops_bom():
    first = read_split("mrpc", SHARED_GLUE / "mrpc" / "train.tsv")[0]
    assert first == Example('Amrozi accused his brother, whom he called "the witness", of deliberately distorting '
                            "his evidence.", 'Referring to him as only "the witness", Amrozi accused his brother of '
                            "deliberately distorting his evidence.", 1)


# ---- bad input: a clear error before any training ----

def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'wnli'.*cola, sst2, mrpc, qqp, stsb, qnli, rte, mnli, boolq"):
        read_split("wnli", tmp_path / "train.tsv")
    with pytest.raises(ValueError, match="unknown task 'copa'"):
        find_split_files("copa", tmp_path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.tsv: no such file \(expected a rte split"):
        read_split("rte", tmp_path / "nope.tsv")
    with pytest.raises(FileNotFoundError, match=r"absent: no such folder"):
        find_split_files("rte", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"no rte train file \(train\.tsv or train\.parquet.*\) in "):
        find_split_files("rte", tmp_path)


def test_missing_dev_split(tmp_path):
    write_tsv(tmp_path / "train.tsv", TSV_CASES["mnli"][0])
    write_tsv(tmp_path / "dev_matched.tsv", TSV_CASES["mnli"][0])
    with pytest.raises(FileNotFoundError, match=r"not dev_mismatched \(looked for dev_mismatched: "
                                                r"dev_mismatched\.tsv or .*validation_mismatched\.parquet"):
        find_split_files("mnli", tmp_path)
    raw = tmp_path / "cola" / "cola_public" / "raw"
    write_tsv(raw / "in_domain_train.tsv", TSV_CASES["cola"][0])
    write_tsv(raw / "in_domain_dev.tsv", TSV_CASES["cola"][0])  # out_of_domain_dev.tsv missing
    with pytest.raises(FileNotFoundError, match=r"not dev .*in_domain_dev\.tsv \+ out_of_domain_dev\.tsv"):
        find_split_files("cola", tmp_path / "cola")


def test_wrong_column_count(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "p", "h", "entailment"],
                                            ["1", "p\th", "h", "entailment"]])
    with pytest.raises(ValueError, match=r"dev\.tsv, line 3: expected 4 tab-separated columns .*got 5"):
        read_split("rte", path)
    path = write_tsv(tmp_path / "train.tsv", [["gj04", "1", "a sentence without the empty column"]])
    with pytest.raises(ValueError, match=r"train\.tsv, line 1: expected 4 tab-separated columns"):
        read_split("cola", path)


def test_bad_labels(tmp_path):
    path = write_tsv(tmp_path / "a.tsv", [["index", "question", "sentence", "label"], ["0", "q", "s", "neutral"]])
    with pytest.raises(ValueError, match=r"a\.tsv, line 2: label 'neutral' is not a qnli label: expected one of "
                                         r"entailment, not_entailment, 0, 1"):
        read_split("qnli", path)
    path = write_tsv(tmp_path / "b.tsv", [["sentence", "label"], ["ok", "1"], ["ok", "2"]])
    with pytest.raises(ValueError, match=r"b\.tsv, line 3: label '2' is not a sst2 label"):
        read_split("sst2", path)
    rows = TSV_CASES["stsb"][0][:2] + [TSV_CASES["stsb"][0][2][:-1] + ["high"]]
    path = write_tsv(tmp_path / "c.tsv", rows)
    with pytest.raises(ValueError, match=r"c\.tsv, line 3: expected a numeric similarity score, got 'high'"):
        read_split("stsb", path)
    pq.write_table(pa.table({"sentence1": ["p"], "sentence2": ["h"], "label": [-1], "idx": [0]}),
                   tmp_path / "test.parquet")
    with pytest.raises(ValueError, match=r"test\.parquet, row 0: label -1 is not a rte label.*test row"):
        read_split("rte", tmp_path / "test.parquet")


def test_missing_column(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", [["index", "question1", "question2", "label"], ["0", "a", "b", "1"]])
    with pytest.raises(ValueError, match=r"train\.tsv: header has no column 'is_duplicate'"):
        read_split("qqp", path)
    pq.write_table(pa.table({"sentence1": ["p"], "hypothesis": ["h"], "label": [0]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: no column 'sentence2'"):
        read_split("rte", tmp_path / "x.parquet")
    (tmp_path / "y.jsonl").write_text(json.dumps({"sentence": "s"}))
    with pytest.raises(ValueError, match=r"y\.jsonl: no column 'label'"):
        read_split("sst2", tmp_path / "y.jsonl")


def test_malformed_json_and_unknown_extension(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"sentence": "s", "label": 0}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"d\.jsonl, line 2: not valid JSON"):
        read_split("sst2", tmp_path / "d.jsonl")
    (tmp_path / "d.csv").write_text("sentence,label\n")
    with pytest.raises(ValueError, match=r"d\.csv: unsupported file type '\.csv'"):
        read_split("sst2", tmp_path / "d.csv")
