"""Every Python example of the README runs alone, as a reader would paste it (in a fresh process,
in an empty folder). `load_model()` gives a tiny random Llama there instead of the bundled model,
which the test environment does not install; everything else is the README's code verbatim."""
import os
import re
import subprocess
import sys
import textwrap

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = [textwrap.dedent(block) for block in  # also the indented ones, in lists
          re.findall(r"^ *```python\n(.*?)^ *```", open(README, encoding="utf-8").read(), re.S | re.M)]

TINY_MODEL = """import knnmem.eval.model as _model
from transformers import AutoModelForCausalLM, AutoTokenizer
_model.load_model = lambda *args, **kwargs: (AutoModelForCausalLM.from_pretrained({path!r}).eval(),
                                             AutoTokenizer.from_pretrained({path!r}), "tiny")
"""


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_readme_example_runs_alone(index, tiny_model_dir, tmp_path):
    code = BLOCKS[index]
    prelude = TINY_MODEL.format(path=tiny_model_dir[0]) if "load_model" in code else ""
    result = subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, f"README example {index + 1} failed:\n{code}\n{result.stderr[-3000:]}"
