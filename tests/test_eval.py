import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import knnmem
from knnmem.eval import corpus
from knnmem.eval.run import main as eval_main
from knnmem.eval.scoring import KINDS, score_document, segment_bounds


def tiny_llama(vocab: int = 300) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=vocab, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def test_every_configuration_scores_tokens_1_to_n_once():
    model = tiny_llama()
    ids = torch.randint(300, (53,))
    assert [b - a for a, b in segment_bounds(53, 16)] == [16, 16, 16, 5]
    lengths = {}
    for kind in KINDS:
        if kind == "memory":
            knnmem.patch(model, topk=4)
        lengths[kind] = score_document(model, ids, kind, segment=16, window=32).numel()
    assert set(lengths.values()) == {52}


def test_none_reproduces_the_models_own_loss_on_the_same_segments():
    model = tiny_llama()
    ids = torch.randint(300, (53,))
    nll = score_document(model, ids, "none", segment=16)
    expected = []
    with torch.no_grad():
        for a, b in segment_bounds(53, 16):
            segment = ids[None, a:b]
            out = model(segment, labels=segment)  # transformers' own shifted loss inside the segment
            expected.append(out.loss.double() * (b - a - 1))
            if b < 53:  # the next segment's first token, scored by this segment's last position
                expected.append(F.cross_entropy(out.logits[0, -1].double(), ids[b]))
    torch.testing.assert_close(nll.sum(), torch.stack(expected).sum(), atol=1e-4, rtol=1e-6)  # fp32 logits


def test_xl_and_long_reduce_to_none_where_they_add_no_context():
    model = tiny_llama()
    ids = torch.randint(300, (49,))  # three full segments of 16 (a short last one would see more)
    none = score_document(model, ids, "none", segment=16)
    torch.testing.assert_close(score_document(model, ids, "long", segment=16, window=16), none)
    torch.testing.assert_close(score_document(model, ids, "xl", segment=16)[:16], none[:16])


def test_split_is_reproducible_and_by_document(tmp_path):
    paths = [str(tmp_path / f"doc{i}.py") for i in range(40)]
    train, validation = corpus.split(paths)
    assert train and validation and not set(train) & set(validation)
    moved = [p.replace(str(tmp_path), "/elsewhere") for p in paths]
    assert [os.path.basename(p) for p in corpus.split(moved)[1]] == [os.path.basename(p) for p in validation]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        corpus.find_documents([str(tmp_path / "missing*.txt")])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A local HF model directory: a tiny Llama and a byte-level BPE tokenizer trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("tiny_model")
    text = corpus.read_text(corpus.default_corpus(1)[0])
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    fast.save_pretrained(directory)
    tiny_llama(vocab=len(fast)).save_pretrained(directory)
    docs = tmp_path_factory.mktemp("docs")
    for i, path in enumerate(corpus.default_corpus(4)):
        (docs / f"doc{i}.py").write_text(corpus.read_text(path)[:3000])
    return str(directory), str(docs)


EVAL_ARGS = ["--split", "all", "--max-docs", "4", "--max-tokens", "96", "--segment", "32", "--window", "64",
             "--memory", "256", "--memory-sweep", "32", "--topk", "4"]


def test_eval_cli_end_to_end(tiny_model_dir, tmp_path):
    model_dir, docs = tiny_model_dir
    out = tmp_path / "eval.json"
    result = eval_main(["--model", model_dir, "--data", docs, "--json", str(out), *EVAL_ARGS])
    saved = json.loads(out.read_text())
    assert set(saved["configs"]) == {"none", "xl", "long", "memory", "memory@32"}
    for c in saved["configs"].values():
        assert c["tokens"] == 4 * 95 and c["ppl"] > 1 and c["tokens_per_s"] > 0
    assert (tmp_path / "eval.png").stat().st_size > 0
    assert saved["settings"]["segment"] == 32 and "torch" in saved["environment"]
    assert result["configs"]["none"]["ppl"] == saved["configs"]["none"]["ppl"]


@pytest.mark.slow
def test_torchrun_two_processes_gather_the_same_totals(tiny_model_dir, tmp_path):
    model_dir, docs = tiny_model_dir
    single = eval_main(["--model", model_dir, "--data", docs, "--json", str(tmp_path / "one.json"), *EVAL_ARGS])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "knnmem.eval",
                    "--model", model_dir, "--data", docs, "--json", str(tmp_path / "two.json"), *EVAL_ARGS],
                   check=True, env=env, capture_output=True, timeout=300)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2
    for name, c in single["configs"].items():
        assert two["configs"][name]["tokens"] == c["tokens"]
        assert two["configs"][name]["ppl"] == pytest.approx(c["ppl"], rel=1e-6)  # fp64 sums, other order
