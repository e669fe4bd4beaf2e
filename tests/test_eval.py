import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import knnmem
from knnmem import corpus
from knnmem.commands.eval import main as eval_main
from knnmem.eval.scoring import KINDS, score_document, uses_memory
from knnmem.stream import windows


def tiny_llama(vocab: int = 300) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=vocab, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def test_every_configuration_scores_tokens_1_to_n_once():
    model = tiny_llama()
    ids = torch.randint(300, (53,))
    assert [w.b - w.a for w in windows(53, 16, 0)] == [16, 16, 16, 5]
    lengths = {}
    for kind in KINDS:
        if uses_memory(kind):
            knnmem.patch(model, topk=4)
        lengths[kind] = score_document(model, ids, kind, segment=16, window=32).numel()
        if uses_memory(kind):
            knnmem.unpatch(model)
    assert set(lengths.values()) == {52}


def test_xl_memory_with_a_memory_too_small_to_retrieve_equals_xl():
    """xl+memory reads with xl's local context; memory only adds what has left it."""
    model = tiny_llama()
    ids = torch.randint(300, (53,))
    xl = score_document(model, ids, "xl", segment=16)
    knnmem.patch(model, topk=4)
    with_memory = score_document(model, ids, "xl+memory", segment=16)
    torch.testing.assert_close(with_memory[:32], xl[:32], atol=1e-5, rtol=1e-5)  # memory empty: fp32 sums
    assert not torch.allclose(with_memory[32:], xl[32:])  # segment 2 retrieves segment 0


def test_none_reproduces_the_models_own_loss_on_the_same_segments():
    model = tiny_llama()
    ids = torch.randint(300, (53,))
    nll = score_document(model, ids, "none", segment=16)
    expected = []
    with torch.no_grad():
        for w in windows(53, 16, 0):
            a, b = w.a, w.b
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


def test_the_local_context_of_xl_is_an_option():
    """context=0 reads each segment alone (= none); context=segment is xl's default; a context of
    two segments reads what long reads with a window of the 4 sinks and three segments."""
    model = tiny_llama()
    ids = torch.randint(300, (81,))
    none = score_document(model, ids, "none", segment=16)
    torch.testing.assert_close(score_document(model, ids, "xl", segment=16, context=0), none)
    torch.testing.assert_close(score_document(model, ids, "xl", segment=16, context=16),
                               score_document(model, ids, "xl", segment=16))
    wide = score_document(model, ids, "xl", segment=16, context=32)
    assert not torch.allclose(wide, score_document(model, ids, "xl", segment=16))
    torch.testing.assert_close(wide, score_document(model, ids, "long", segment=16, window=52), atol=1e-5, rtol=1e-5)


def test_split_is_reproducible_and_by_document(tmp_path):
    paths = [str(tmp_path / f"doc{i}.py") for i in range(40)]
    train, validation = corpus.split(paths)
    assert train and validation and not set(train) & set(validation)
    moved = [p.replace(str(tmp_path), "/elsewhere") for p in paths]
    assert [os.path.basename(p) for p in corpus.split(moved)[1]] == [os.path.basename(p) for p in validation]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        corpus.find_documents([str(tmp_path / "missing*.txt")])


EVAL_ARGS = ["--max-docs", "4", "--max-tokens", "96", "--segment", "32", "--window", "64",
             "--configs", "none", "xl", "long", "memory", "xl+memory",
             "--memory", "256", "--memory-sweep", "32", "--topk", "4", "--pinned", "2"]


def test_eval_cli_end_to_end(tiny_model_dir, tmp_path):
    model_dir, docs = tiny_model_dir
    out = tmp_path / "eval.json"
    result = eval_main(["--model", model_dir, "--data", docs, "--json", str(out), *EVAL_ARGS])
    saved = json.loads(out.read_text())
    assert set(saved["configs"]) == {"none", "xl", "long", "memory", "memory@32", "xl+memory", "xl+memory@32"}
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


@pytest.mark.parametrize("options, message", [
    (["--segment", "0"], "--segment must be a positive integer"),
    (["--max-tokens", "-1"], "--max-tokens must be a positive integer"),
    (["--max-tokens", "40", "--segment", "32"], "at least two segments"),
    (["--topk", "0"], "--topk must be a positive integer"),
    (["--memory", "0"], "--memory must be a positive integer"),
    (["--memory-sweep", "0"], "sizes must be positive"),
    (["--pinned", "300"], "--pinned must be in"),
    (["--layers", "1-0"], "is empty"),
    (["--layers", "a-b"], "--layers must be"),
    (["--layers", "0,7"], "this model has layers 0..1"),
    (["--memory-backend", "bogus"], "invalid choice"),
    (["--json", "/proc/knnmem/eval.json"], "cannot write results"),
])
def test_eval_cli_rejects_bad_options_before_running(tiny_model_dir, tmp_path, options, message, capsys):
    model_dir, docs = tiny_model_dir
    argv = ["--model", model_dir, "--data", docs, "--json", str(tmp_path / "e.json"), *EVAL_ARGS, *options]
    with pytest.raises(SystemExit) as exit_info:
        eval_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_eval_cli_model_folder_and_data_errors(tmp_path, tiny_model_dir, capsys):
    _, docs = tiny_model_dir
    with pytest.raises(SystemExit):
        eval_main(["--model", str(tmp_path), "--data", docs, "--json", str(tmp_path / "e.json")])
    assert "--model" in capsys.readouterr().err


def test_named_data_files_are_all_evaluated(tiny_model_dir, tmp_path):
    """Files a user names are evaluated unless a split is asked for (none vanish into a train split)."""
    model_dir, docs = tiny_model_dir
    result = eval_main(["--model", model_dir, "--data", docs, "--json", str(tmp_path / "e.json"),
                        *EVAL_ARGS, "--configs", "none"])
    assert len(result["documents"]) == 4
    assert all(not os.path.isabs(d["name"]) for d in result["documents"])
    assert all(not os.path.isabs(name) for name in result["settings"]["data"])  # no paths of this machine


def test_passkey_harness_scores_an_oracle_perfectly_and_a_memoryless_tiny_model_at_chance(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from knnmem.eval.passkey import evaluate, model_answerer

    model_dir, _ = tiny_model_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def oracle(ids):  # reads the key from the prompt (its only digits), as a perfect long-context model would
        return "".join(c for c in tokenizer.decode(ids) if c.isdigit())[:5]

    table = evaluate(oracle, tokenizer, lengths=[200, 400], depths=[0.0, 0.5, 1.0], trials=3)
    assert all(acc == 1.0 for row in table.values() for acc in row.values())
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for config in ("local", "memory"):
        answer = model_answerer(model, tokenizer, config, segment=64, max_memories=512, topk=4)
        table = evaluate(answer, tokenizer, lengths=[300], depths=[0.2, 0.8], trials=2)
        assert all(acc == 0.0 for row in table.values() for acc in row.values())  # 1e-5 chance per key


def test_recall_task_end_to_end(tiny_model_dir, tmp_path):
    from knnmem.eval.recall import FAMILIES, all_facts, documents, questions, wilson_interval

    facts = all_facts(list(FAMILIES), 8, seed=0)
    assert facts == all_facts(list(FAMILIES), 8, seed=0) and facts != all_facts(list(FAMILIES), 8, seed=1)  # seeded
    assert [f for f, _, _ in facts] == ["unicode"] * 8 + ["html"] * 8 + ["errno"] * 8
    asked = questions(facts, choices=3, seed=0)
    assert [c[0] for _, _, c in asked] == [value for _, _, value in facts] and all(len(set(c)) == 3 for _, _, c in asked)
    values = {f: {v for g, _, v in facts if g == f} for f in FAMILIES}
    assert all(set(c) <= values[f] for f, _, c in asked)  # distractors come from the same family
    texts = documents(facts, 4, seed=0)
    assert len(texts) == 6 and all(FAMILIES[f].state(k, v) in " ".join(texts) for f, k, v in facts)
    assert "Error ENOENT has errno=2." == FAMILIES["errno"].state("ENOENT", "2")
    low, high = wilson_interval(30, 100)
    assert 0.21 < low < 0.22 and 0.39 < high < 0.40 and wilson_interval(0, 10)[0] == 0.0
    model_dir, _ = tiny_model_dir
    out = tmp_path / "recall.json"
    eval_main(["--task", "recall", "--model", model_dir, "--facts", "4", "--facts-per-document", "4", "--choices", "3",
               "--pq-m", "4", "--pq-bits", "4", "--sparse-keep", "4", "--sparse-chunk", "16", "--adapter-steps", "3",
               "--json", str(out), "--device", "cpu"])
    result = json.loads(out.read_text())
    configs = result["configs"]
    assert list(configs) == ["none", "prompt", "knowledge-fp16", "knowledge-sparse", "knowledge-pq", "adapter"]
    assert all(0 <= c["accuracy"] <= 1 and c["seconds_per_question"] > 0 for c in configs.values())
    assert all(c["questions"] == 12 and set(c["by_family"]) == {"unicode", "html", "errno"} for c in configs.values())
    assert all(c["interval95"][0] <= c["accuracy"] <= c["interval95"][1] for c in configs.values())
    assert configs["prompt"]["prompt_tokens"] > configs["none"]["prompt_tokens"] + result["memorised_tokens"]
    assert configs["knowledge-fp16"]["prompt_tokens"] == configs["none"]["prompt_tokens"]
    fp16 = 2 * 2 * 2 * 8 * 2  # layers x KV heads x (key, value) x head dim x 2 bytes
    assert configs["knowledge-fp16"]["bytes_per_token"] == fp16
    assert configs["knowledge-pq"]["bytes_per_token"] == 2 * 2 * 2 * 4 * 4 / 8
    assert configs["knowledge-sparse"]["bytes_per_token"] < fp16 / 2
    assert os.path.exists(tmp_path / "recall.png")


@pytest.mark.parametrize("options, message", [
    (["--facts", "0"], "--facts must be a positive integer"),
    (["--choices", "1"], "--choices must be in"),
    (["--facts", "100000"], "--facts must be in"),
    (["--families", "errno", "--facts", "200"], "for the errno family"),
    (["--sparse-keep", "200"], "keep (200) must be at most chunk"),
    (["--pq-m", "3", "--configs", "knowledge-pq"], "--pq-m must divide"),
])
def test_recall_rejects_bad_options(tiny_model_dir, tmp_path, options, message, capsys):
    with pytest.raises(SystemExit):
        eval_main(["--task", "recall", "--model", tiny_model_dir[0], "--json", str(tmp_path / "r.json"), *options])
    assert message in capsys.readouterr().err


def test_passkey_sinks_and_window_reads_the_first_tokens_and_the_last_that_fit(tiny_model_dir, monkeypatch):
    """While the prompt fits the native context, sinks+window reads all of it; beyond, the first 4
    tokens and the last ones that fit with the answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from knnmem.eval.passkey import make_prompt, model_answerer

    model_dir, _ = tiny_model_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # 512 native positions
    full, window = (model_answerer(model, tokenizer, config, segment=64) for config in ("full", "sinks+window"))
    short = make_prompt(tokenizer, 300, 0.5, "12345")
    assert window(short) == full(short)
    long = make_prompt(tokenizer, 1500, 0.5, "12345")
    read = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda ids, **kw: read.append(ids[0]) or generate(ids, **kw))
    window(long)
    assert torch.equal(read[0], torch.cat([long[:4], long[-(512 - 4 - 8):]]))


def test_an_interrupted_eval_keeps_every_configuration_it_finished(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import knnmem.eval.perplexity as perplexity

    model_dir, docs = tiny_model_dir
    real, calls = perplexity.score_document, []

    def interrupted_in_the_third_config(model, ids, kind, *args, **kwargs):
        calls.append(kind)
        if kind == "long":
            raise KeyboardInterrupt
        return real(model, ids, kind, *args, **kwargs)

    monkeypatch.setattr(perplexity, "score_document", interrupted_in_the_third_config)
    out = tmp_path / "eval.json"
    with pytest.raises(KeyboardInterrupt):
        eval_main(["--model", model_dir, "--data", docs, "--json", str(out), *EVAL_ARGS[:8],
                   "--configs", "none", "xl", "long"])
    saved = json.loads(out.read_text())
    assert list(saved["configs"]) == ["none", "xl"] and saved["configs"]["xl"]["tokens"] == 4 * 95
    assert set(saved["configs"]["none"]["ppl_by_document"]) == {f"doc{i}.py" for i in range(4)}
    printed = capsys.readouterr().out
    assert "none" in printed and "xl" in printed  # each row printed as it finished


def test_passkey_checks_its_output_before_loading_and_writes_after_each_config(tiny_model_dir, tmp_path, capsys):
    from knnmem.commands.passkey import main as passkey_main

    model_dir, _ = tiny_model_dir
    with pytest.raises(SystemExit):
        passkey_main(["--model", model_dir, "--json", str(tmp_path), "--lengths", "200", "--segment", "64"])  # a folder
    assert "cannot write results" in capsys.readouterr().err
    out = tmp_path / "p.json"
    passkey_main(["--model", model_dir, "--json", str(out), "--lengths", "200", "--depths", "0.5", "--trials", "1",
                  "--segment", "64", "--configs", "local", "full", "--heads", "all"])
    assert set(json.loads(out.read_text())["accuracy"]) == {"local", "full"}


def test_the_plot_by_memory_size_has_a_line_for_every_memory_kind(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from knnmem.eval.report import save_plot

    def config(kind, memory, ppl):
        return {"kind": kind, "memory": memory, "ppl": ppl, "ppl_by_segment": [ppl, ppl]}

    result = {"settings": {"segment": 512, "memory": 4096},
              "configs": {"xl": config("xl", None, 7.0), "xl+memory": config("xl+memory", 4096, 6.0),
                          "xl+memory@1024": config("xl+memory", 1024, 6.5), "memory": config("memory", 4096, 6.8)}}
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    save_plot(result, str(tmp_path / "plot.png"))
    by_size = figures[0].axes[1]
    lines = {line.get_label(): list(line.get_xdata()) for line in by_size.get_lines()}
    assert lines["xl+memory"] == [1024, 4096] and lines["memory"] == [4096] and "xl" in lines


def test_model_accepts_a_hub_id_from_the_local_cache_only(tiny_model_dir, tmp_path):
    """--model org/name loads from the local Hugging Face cache; an id not cached is a clear error."""
    import shutil
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--knnmem--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir[0], snapshot)
    (tmp_path / "hub" / "models--knnmem--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--knnmem--tiny" / "refs" / "main").write_text("0" * 40)
    code = ("from knnmem.eval.model import load_model\n"
            "model, tokenizer, name = load_model('knnmem/tiny')\n"
            "print(type(model).__name__, name)\n"
            "try:\n    load_model('knnmem/absent')\nexcept FileNotFoundError as err:\n    print('refused:', err)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "LlamaForCausalLM knnmem/tiny" in out.stdout, out.stderr[-2000:]
    assert "refused: 'knnmem/absent' is neither a local Hugging Face model directory nor a Hub id" in out.stdout


@pytest.mark.parametrize("command", [["eval"], ["eval", "--task", "recall"], ["passkey"], ["train"], ["calibrate"]])
def test_every_command_help_shows_the_defaults(command, capsys):
    from knnmem.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0 and "(default: " in capsys.readouterr().out


def test_recall_questions_continue_a_cached_context_as_if_it_were_read_with_them(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from knnmem.eval.recall import _context_cache, candidate_scores

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir[0]).eval()
    context, question, candidates = list(range(5, 45)), [7, 8, 9], [[10, 11], [12], [13, 14, 15]]
    cache = _context_cache(model, context)
    cached = candidate_scores(model, question, candidates, cache)
    assert cache.get_seq_length() == len(context)  # cropped back: the next question reads the same context
    assert cached == pytest.approx(candidate_scores(model, context + question, candidates), abs=1e-4)
    assert candidate_scores(model, question, candidates, cache) == pytest.approx(cached, abs=1e-6)
    # each candidate is scored as if read alone after the prefix
    alone = [candidate_scores(model, context + question, [c])[0] for c in candidates]
    assert cached == pytest.approx(alone, abs=1e-4)


def test_recorded_options_name_no_path_of_this_machine():
    import argparse
    import glob
    import sysconfig

    from knnmem.corpus import recorded_options

    stdlib = sysconfig.get_paths()["stdlib"]
    args = argparse.Namespace(json="/tmp/x/out.json", data=[os.path.join(stdlib, "json", "decoder.py"), "rel/a.py"],
                              plot="eval_results/p.png", layer_list=[1], steps=3)
    assert recorded_options(args, ("layer_list",)) == {
        "json": "out.json", "data": [os.path.join("json", "decoder.py"), "rel/a.py"], "plot": "eval_results/p.png",
        "steps": 3}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in glob.glob(os.path.join(root, "benchmarks", "results", "**", "*.json"), recursive=True):
        with open(path) as f:
            text = f.read()
        assert not re.search(r'"(/tmp|/work|/root|/home)/', text), f"{path} records a path of this machine"
