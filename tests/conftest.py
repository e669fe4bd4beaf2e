import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (on CPU tensors). It must be set before
# the kernels are defined, i.e. before knnmem.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """(model directory, documents directory): a tiny Llama with a byte-level BPE tokenizer
    trained here, and 4 documents of 3000 characters."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from knnmem import corpus

    directory = tmp_path_factory.mktemp("tiny_model")
    text = corpus.read_text(corpus.default_corpus(1)[0])
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=len(fast), max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(directory)
    docs = tmp_path_factory.mktemp("docs")
    for i, path in enumerate(corpus.default_corpus(4)):
        (docs / f"doc{i}.py").write_text(corpus.read_text(path)[:3000])
    return str(directory), str(docs)
