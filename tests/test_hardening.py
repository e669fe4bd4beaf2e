"""Hardening, round 2 (issue 21): each test covers a class of defect, not only its first example.

1. non-finite numbers are errors, never results; 2. sizes follow what is stored; 3. state changes
are all-or-nothing; 6. files are regular files of bounded size and shape.
"""
import argparse
import json
import math
import os

import pytest
import torch

import knnmem
from knnmem import adapters
from knnmem.commands.common import finite_float
from knnmem.eval.recall import answered_right, candidate_scores
from knnmem.files import check_regular_file, read_json, read_tensors_and_json, save_tensors_and_json
from knnmem.knowledge import KnowledgeMemory, Storage
from knnmem.memory import KNNMemory
from knnmem.train import TrainSettings, load_trained, prepare, train
from knnmem.train.loop import STATE_FILE
from knnmem.train.trainable import TRAINED_FILE
from test_patch import VOCAB, tiny
from test_train import SMALL, _llama, _repeating_documents


# ---------------------------------------------------------------- 1. non-finite numbers
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN"])
def test_every_float_option_refuses_non_finite_values(text):
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        finite_float(text)
    assert finite_float("1e-3") == 1e-3


@pytest.mark.parametrize("field", ["lr", "lr_memory", "clip", "weight_decay", "min_lr_ratio"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_training_settings_refuse_non_finite_numbers(field, value):
    with pytest.raises(ValueError, match=field):
        TrainSettings(**{field: value}).validate()


def test_nan_logits_rank_no_candidate_and_ties_are_wrong():
    model = tiny("llama")
    with torch.no_grad():
        model.lm_head.weight.fill_(math.nan)
    with pytest.raises(FloatingPointError, match="not finite"):
        candidate_scores(model, [1, 2, 3], [[4], [5, 6]])
    assert not answered_right([-1.0, -1.0, -3.0])  # a tie with a distractor is not an answer
    assert answered_right([-0.5, -1.0, -3.0])


def test_adapter_gate_must_be_finite():
    model = tiny("llama")
    for bad in (math.nan, math.inf, "0"):
        with pytest.raises(ValueError, match="gate_init"):
            adapters.attach(model, gate_init=bad)
    assert adapters.attached(model) is None


def _trained_checkpoint(tmp_path, steps=2):
    model = _llama()
    knnmem.patch(model, layers=[1], mode="gate", logits="normalized", max_memories=128)
    prepare(model, "lora", lora_rank=2)
    train(model, _repeating_documents(2, 64), TrainSettings(steps=steps, **SMALL), output=str(tmp_path),
          progress=False)
    return model


def test_a_non_finite_loss_stops_training_and_keeps_the_checkpoint(tmp_path):
    model = _trained_checkpoint(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in (TRAINED_FILE, STATE_FILE)}
    (tmp_path / STATE_FILE).rename(tmp_path / "kept.pt")  # a new run into the same folder
    with torch.no_grad():
        knnmem.memory_parameters(model)[0].fill_(math.nan)
    with pytest.raises(FloatingPointError, match="stopped"):
        train(model, _repeating_documents(2, 64), TrainSettings(steps=4, **{**SMALL, "save_every": 1}),
              output=str(tmp_path), progress=False)
    (tmp_path / "kept.pt").rename(tmp_path / STATE_FILE)
    assert {f: (tmp_path / f).read_bytes() for f in before} == before


def test_an_update_that_diverges_stops_before_any_save(tmp_path):
    model = _llama()
    knnmem.patch(model, layers=[1], mode="gate", logits="normalized", max_memories=128)
    prepare(model, "attention")
    with pytest.raises(FloatingPointError):  # the loss, the gradient or the weights go non-finite
        train(model, _repeating_documents(2, 64), TrainSettings(steps=6, **{**SMALL, "lr": 1e30, "clip": 0.0}),
              output=str(tmp_path), progress=False)
    assert not (tmp_path / TRAINED_FILE).exists()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_trained_and_patch_files_with_non_finite_values_are_refused_and_change_nothing(bad, tmp_path):
    _trained_checkpoint(tmp_path)
    tensors, info = read_tensors_and_json(tmp_path / TRAINED_FILE, "knnmem_trained", "checkpoint")
    name = next(n for n in tensors if "lora_A" in n)
    tensors[name] = torch.full_like(tensors[name], bad)
    save_tensors_and_json(tmp_path / TRAINED_FILE, tensors, "knnmem_trained", info)
    fresh = _llama()
    before = {n: (p.clone(), p.requires_grad) for n, p in fresh.named_parameters()}
    modules = [type(m).__name__ for m in fresh.modules()]
    with pytest.raises(ValueError, match="NaN or inf"):
        load_trained(fresh, tmp_path)
    assert not hasattr(fresh, "knnmem") and [type(m).__name__ for m in fresh.modules()] == modules  # no LoRA left
    for n, p in fresh.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]

    model = tiny("llama")
    knnmem.patch(model)
    knnmem.save_patch(model, tmp_path / "patch")
    path = tmp_path / "patch" / "knnmem_patch.safetensors"
    tensors, settings = read_tensors_and_json(path, "knnmem_patch", "patch")
    scale = next(n for n in tensors if n.endswith("knn_memory_scale"))
    tensors[scale] = torch.full_like(tensors[scale], bad)
    save_tensors_and_json(path, tensors, "knnmem_patch", settings)
    fresh = tiny("llama")
    with pytest.raises(ValueError, match="knn_memory_scale"):
        knnmem.load_patch(fresh, tmp_path / "patch")
    assert not hasattr(fresh, "knnmem")


def test_pq_knowledge_with_non_finite_or_missing_codebooks_is_refused(tmp_path):
    model = tiny("llama")
    handle = knnmem.patch(model, topk=4)
    knowledge = handle.memorize([torch.randint(VOCAB, (40,))], storage=Storage("pq", pq_m=4, pq_bits=4),
                                progress=False)
    path = tmp_path / "k.safetensors"
    knowledge.save(path)
    tensors, meta = read_tensors_and_json(path, "knnmem_knowledge", "knowledge")
    import faiss

    name = next(n for n in tensors if n.endswith("key_index.0"))
    index = faiss.deserialize_index(tensors[name].numpy())
    centroids = faiss.vector_to_array(index.pq.centroids)
    centroids[0] = math.nan
    faiss.copy_array_to_vector(centroids, index.pq.centroids)
    broken = {**tensors, name: torch.from_numpy(faiss.serialize_index(index))}
    save_tensors_and_json(path, broken, "knnmem_knowledge", meta)
    with pytest.raises(ValueError, match="NaN or inf codebooks"):
        KnowledgeMemory.load(path)
    # codebooks larger than the file holds (edited pq_bits): refused before anything is built
    save_tensors_and_json(path, tensors, "knnmem_knowledge", {**meta, "storage": {**meta["storage"], "pq_bits": 16}})
    with pytest.raises(ValueError, match="fewer than the"):
        KnowledgeMemory.load(path)
    untrained = faiss.IndexPQ(index.d, index.pq.M, index.pq.nbits, faiss.METRIC_INNER_PRODUCT)
    padded = faiss.serialize_index(untrained)
    filler = torch.zeros(4 * 2 ** 4 * index.d, dtype=torch.uint8)  # big enough to pass the size bound
    save_tensors_and_json(path, {**tensors, name: torch.cat([torch.from_numpy(padded), filler])},
                          "knnmem_knowledge", meta)
    with pytest.raises(ValueError, match="untrained|not a readable"):
        KnowledgeMemory.load(path)


# ---------------------------------------------------------------- 2. sizes follow what is stored
@pytest.mark.parametrize("backend", ["exact", "ivf"])
def test_search_never_pads_beyond_what_is_stored(backend):
    memory = KNNMemory(2, 1, 4, 64, backend=backend)
    memory.add(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), mask=torch.tensor([[True] * 3, [True, False, False]]))
    scores, indices = memory.search(torch.randn(2, 1, 5, 4), 2 ** 31)
    assert indices.shape == (2, 1, 5, 3) and scores.shape == (2, 1, 5, 3)
    assert (indices[1, ..., 1:] == -1).all() and (indices[0] >= 0).all()
    empty = KNNMemory(1, 1, 4, 64, backend=backend)
    assert empty.search(torch.randn(1, 1, 2, 4), 2 ** 31)[1].shape == (1, 1, 2, 1)


def test_a_patch_with_a_huge_topk_reads_only_what_is_stored():
    model = tiny("llama")
    knnmem.patch(model, topk=2 ** 31)
    ids = torch.randint(VOCAB, (1, 8))
    with torch.no_grad():
        model(ids, use_cache=False)
        model(ids, use_cache=False)
    assert max(i.shape[-1] for i in model.knnmem.last_indices.values()) == 8


# ---------------------------------------------------------------- 3. all-or-nothing state changes
def test_resume_refuses_parameters_and_state_of_different_steps(tmp_path):
    _trained_checkpoint(tmp_path, steps=2)
    kept = (tmp_path / TRAINED_FILE).read_bytes()
    state = (tmp_path / STATE_FILE).read_bytes()
    (tmp_path / STATE_FILE).unlink()
    _trained_checkpoint(tmp_path, steps=3)  # a later save whose trainer state never landed:
    (tmp_path / STATE_FILE).write_bytes(state)  # parameters of step 3, trainer state of step 2
    assert (tmp_path / TRAINED_FILE).read_bytes() != kept
    model = _llama()
    knnmem.patch(model, layers=[1], mode="gate", logits="normalized", max_memories=128)
    prepare(model, "lora", lora_rank=2)
    with pytest.raises(ValueError, match="a save was interrupted"):
        train(model, _repeating_documents(2, 64), TrainSettings(steps=2, **SMALL), output=str(tmp_path),
              resume=True, progress=False)


def test_training_never_overwrites_a_checkpoint_without_resume(tmp_path):
    _trained_checkpoint(tmp_path)
    before = (tmp_path / TRAINED_FILE).read_bytes()
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        _trained_checkpoint(tmp_path)
    assert (tmp_path / TRAINED_FILE).read_bytes() == before


# ---------------------------------------------------------------- 6. files
def test_knnmem_reads_only_regular_files(tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    os.symlink(target, tmp_path / "link.json")
    os.mkfifo(tmp_path / "fifo.json")
    for name, message in [("link.json", "symbolic link"), ("fifo.json", "not a regular file"),
                          ("missing.json", "not a readable")]:
        with pytest.raises(ValueError, match=message):
            read_json(tmp_path / name, "knnmem handle file")
        with pytest.raises(ValueError, match=message):
            check_regular_file(tmp_path / name, "knnmem file")
    with pytest.raises(ValueError, match="symbolic link"):
        read_tensors_and_json(tmp_path / "link.json", "k", "knnmem memory file")


def test_deeply_nested_json_is_a_value_error(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_json(tmp_path / "deep.json", "knnmem handle file")
    save_tensors_and_json(tmp_path / "deep.safetensors", {"x": torch.zeros(1)}, "k", None)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "deep.safetensors"), metadata={"k": "[" * 100000 + "]" * 100000})
    with pytest.raises(ValueError, match="nested too deeply"):
        read_tensors_and_json(tmp_path / "deep.safetensors", "k", "knnmem memory file")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not a dict", "missing field"])
def test_a_damaged_trainer_state_is_a_value_error_naming_it(damage, tmp_path):
    _trained_checkpoint(tmp_path)
    path = tmp_path / STATE_FILE
    if damage == "garbage":
        path.write_bytes(b"\x80\x04not a pickle")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "not a dict":
        torch.save([1, 2], path)
    else:
        state = torch.load(path, weights_only=True)
        del state["optimizer"]
        torch.save(state, path)
    model = _llama()
    knnmem.patch(model, layers=[1], mode="gate", logits="normalized", max_memories=128)
    prepare(model, "lora", lora_rank=2)
    with pytest.raises(ValueError, match=STATE_FILE):
        train(model, _repeating_documents(2, 64), TrainSettings(steps=2, **SMALL), output=str(tmp_path),
              resume=True, progress=False)


def _saved_handle(directory):
    """A patched tiny model that has read 8 tokens, its handle saved to `directory`."""
    model = tiny("llama")
    handle = knnmem.patch(model)
    with torch.no_grad():
        model(torch.randint(VOCAB, (1, 8)), use_cache=False)
    handle.save(directory)
    return handle


def test_handle_json_is_parsed_as_data(tmp_path):
    handle = _saved_handle(tmp_path / "mem")
    meta = json.loads((tmp_path / "mem" / "handle.json").read_text())
    (tmp_path / "mem" / "handle.json").unlink()
    os.symlink(tmp_path / "outside.json", tmp_path / "mem" / "handle.json")
    (tmp_path / "outside.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="symbolic link"):
        handle.load(tmp_path / "mem")


def test_knowledge_add_is_all_or_nothing_across_layers():
    knowledge = KnowledgeMemory([0, 1], 2, 8, False, Storage("fp16"), "model")
    ok = (torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.ones(2, 5))
    too_large = (torch.full((2, 5, 8), 1e6), torch.randn(2, 5, 8), torch.ones(2, 5))  # beyond float16
    with pytest.raises(ValueError, match="float16"):
        knowledge.add([{0: ok, 1: too_large}])
    assert [len(store) for store in knowledge.stores.values()] == [0, 0] and knowledge.tokens == 0
    knowledge.add([{0: ok, 1: ok}])
    assert [len(store) for store in knowledge.stores.values()] == [5, 5]


def test_knowledge_is_refused_after_the_memory_layers_attention_changes():
    model = tiny("llama")
    handle = knnmem.patch(model, topk=4)
    knowledge = handle.memorize([torch.randint(VOCAB, (20,))], progress=False)
    handle.knowledge = None
    handle.knowledge = knowledge  # same weights: accepted
    handle.knowledge = None
    with torch.no_grad():
        attention = knnmem.hf.attention_modules(model)[handle.layers[-1]]
        next(p for n, p in attention.named_parameters() if "v_proj" in n).mul_(1.5)  # e.g. --train attention
    with pytest.raises(ValueError, match="memorised by another model or patch"):
        handle.knowledge = knowledge


def test_concurrent_handle_saves_into_one_folder_never_delete_each_others_files(tmp_path):
    handle = _saved_handle(tmp_path / "mem")
    first = set(os.listdir(tmp_path / "mem"))
    other_snapshot = {name.replace(name.split(".")[1], "b" * 12) for name in first if name.startswith("layer_")}
    for name in other_snapshot:  # files of another process's save, not yet named by handle.json
        (tmp_path / "mem" / name).write_bytes((tmp_path / "mem" / next(iter(first - {"handle.json"}))).read_bytes())
    handle.save(tmp_path / "mem")
    now = set(os.listdir(tmp_path / "mem"))
    assert other_snapshot <= now  # kept
    assert not (first - {"handle.json"}) & now  # the snapshot named before was replaced
    handle.load(tmp_path / "mem")


# ---------------------------------------------------------------- 7. loose parsing
@pytest.mark.parametrize("layers", [[False, True], [1.0], "1", [-1]])
def test_memorizing_config_takes_only_integer_layer_indices(layers):
    with pytest.raises(ValueError, match="memory_layers"):
        knnmem.MemorizingConfig(memory_layers=layers).validate()


def test_a_capacity_below_topk_reads_what_it_holds():
    model = tiny("llama")
    knnmem.patch(model, max_memories=3)
    ids = torch.randint(VOCAB, (1, 8))
    with torch.no_grad():
        for _ in range(3):
            out = model(ids, use_cache=False).logits
    assert torch.isfinite(out).all() and max(i.shape[-1] for i in model.knnmem.last_indices.values()) == 3


# ---------------------------------------------------------------- 4. commands fail before the work
def _no_work(*args, **kwargs):
    raise AssertionError("the work started before the bad option was refused")


@pytest.mark.parametrize("command, options, message", [
    ("recall", ["--layers", "99"], "this model has layers"),
    ("recall", ["--adapter-layer", "99"], "--adapter-layer must be a block"),
    ("recall", ["--seed", str(10 ** 20)], "--seed must be in"),
    ("recall", ["--pq-bits", "16", "--configs", "knowledge-pq"], "--pq-bits 16"),
    ("recall", ["--adapter-gate-init", "nan"], "--adapter-gate-init"),
    ("recall", ["--json", "DIR"], "cannot write results"),
    ("eval", ["--checkpoint", "GARBAGE"], "--checkpoint"),
    ("eval", ["--json", "DIR"], "cannot write results"),
    ("passkey", ["--json", "DIR"], "cannot write results"),
    ("passkey", ["--depths", "nan"], "--depths"),
    ("train", ["--distance", "-1"], "distance must be"),
    ("train", ["--data", "no/such/*.txt"], "matches no file"),
    ("train", ["--lora-rank", str(10 ** 8), "--train", "lora"], "--lora-rank must be at most"),
    ("train", ["--clip", "nan"], "--clip"),
    ("train", ["--lr-memory", "inf"], "--lr-memory"),
    ("train", ["--mode", "joint", "--logits", "raw"], "has nothing to train"),
])
def test_commands_refuse_bad_options_before_any_work(command, options, message, tiny_model_dir, tmp_path, monkeypatch,
                                                     capsys):
    import knnmem.commands.eval as eval_command
    import knnmem.commands.passkey as passkey_command
    import knnmem.commands.recall as recall_command
    import knnmem.commands.train as train_command

    for module, work in [(recall_command, "evaluate_recall"), (eval_command, "evaluate_perplexity"),
                         (passkey_command, "evaluate_configs"), (train_command, "fine_tune")]:
        monkeypatch.setattr(module, work, _no_work)
    model_dir, docs = tiny_model_dir
    (tmp_path / "DIR").mkdir()
    garbage = tmp_path / "GARBAGE"
    garbage.mkdir()
    (garbage / TRAINED_FILE).write_bytes(b"not safetensors")
    options = [{"DIR": str(tmp_path / "DIR"), "GARBAGE": str(garbage)}.get(o, o) for o in options]
    out = ["--json", str(tmp_path / "r.json")] if command != "train" else ["--output", str(tmp_path / "run")]
    main = {"recall": lambda a: eval_command.main(["--task", "recall", "--pq-m", "4", *a]), "eval": eval_command.main,
            "passkey": passkey_command.main, "train": train_command.main}[command]
    data = ["--data", docs] if command in ("eval", "train") else []
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", model_dir, *data, *out, *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_joint_mode_trains_its_memory_scales_from_the_first_window_and_raw_joint_is_refused():
    model = _llama()
    knnmem.patch(model, layers=[1], mode="joint", logits="normalized", max_memories=128)
    prepare(model, "memory")  # the first window has no memory yet: its loss reaches no trained parameter
    log = train(model, _repeating_documents(2, 64), TrainSettings(steps=3, **SMALL), progress=False)
    assert len(log["history"]) == 3 and all(math.isfinite(x) for x in log["history"])
    raw = _llama()
    knnmem.patch(raw, layers=[1], mode="joint", logits="raw", max_memories=128)
    with pytest.raises(ValueError, match="neither affects the output"):
        prepare(raw, "memory")


def test_a_huge_max_tokens_sizes_nothing_beyond_the_documents_read():
    from knnmem.eval.perplexity import PerplexityRun, evaluate_perplexity

    model = tiny("llama")
    documents = [("a.py", torch.randint(VOCAB, (40,))), ("b.py", torch.randint(VOCAB, (24,)))]
    run = PerplexityRun(configs=["none"], segment=16, max_tokens=10 ** 12)
    result = evaluate_perplexity(model, "tiny", documents, run)
    assert len(result["configs"]["none"]["ppl_by_segment"]) == 3 and result["configs"]["none"]["tokens"] == 39 + 23


def test_an_eval_run_takes_only_options_of_patch():
    from knnmem.eval.perplexity import PerplexityRun

    assert PerplexityRun(patch_options={"topk": 4, "heads": [[0, 1]]}).patch_options["topk"] == 4
    for bad in ({"max_memories": 1024}, {"top_k": 4}):
        with pytest.raises(ValueError, match="patch_options: .* not options of knnmem.patch"):
            PerplexityRun(patch_options=bad)


def test_saved_files_get_the_mode_of_any_new_file(tmp_path):
    from knnmem.files import write_json

    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644
