"""Every causal-LM model type of the installed transformers: an exact edit or a typed refusal.

`tests/families.py` builds each type tiny (the config fields that change its outputs set away
from their defaults) and edits it with the fast path and with the reference. No type may fail
or differ; the dense decoders below must edit; suffix-only z steps must run wherever the type's
attention allows them; the table in docs/families.md must be this run's.
"""

import re
from pathlib import Path

import pytest
import transformers

from .families import causal_lm_types, outcome, table

# Dense decoders that must edit exactly wherever the installed transformers has them.
MUST_EDIT = {
    "apertus", "arcee", "bitnet", "bloom", "cohere", "cohere2", "cwm", "diffllama", "doge", "ernie4_5", "exaone",
    "exaone4", "falcon", "gemma", "gemma2", "gemma3", "gemma3_text", "glm", "glm4", "gpt-sw3", "gpt2",
    "gpt_bigcode", "gpt_neox", "gptj", "granite", "helium", "hunyuan_v1_dense", "internlm3", "llama", "ministral",
    "ministral3", "mistral", "nemotron", "olmo", "olmo2", "olmo3", "phi", "phi3", "qwen2", "qwen3", "qwen3_5",
    "qwen3_5_text", "seed_oss", "smollm3", "stablelm", "starcoder2", "vaultgemma",
}
# Types whose attention does not take the cache suffix-only steps hand over: the probe must send
# them to whole-row steps (values.fast_steps_exact), and only them.
WHOLE_ROW_TYPES = {
    "qwen3_5": "linear-attention layers keep a recurrent state, not keys and values",
    "qwen3_5_text": "linear-attention layers keep a recurrent state, not keys and values",
    "olmo_hybrid": "linear-attention layers keep a recurrent state, not keys and values",
    "deepseek_v32": "its indexer keeps a key cache of its own",
}
if transformers.__version__ < "5":
    WHOLE_ROW_TYPES |= {
        "gpt_bigcode": "4.x keeps its keys and values fused in a legacy tuple cache",
        "nemotron": "4.x's attention with a cache differs from whole rows (by 0.12, measured by the probe)",
    }
# Types refused because the z step cannot run their blocks: (what the refusal must say).
REFUSED_FOR_BLOCKS = {
    "dory": "does not run its blocks once each in order",  # looped depth: blocks 0-3 run twice
    "glm_moe_dsa": "besides the hidden state, which the next block takes",  # top-k indices go block to block
}
FAMILIES_DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"


@pytest.mark.parametrize("model_type", causal_lm_types())
def test_every_model_type_edits_as_the_reference_or_is_refused(model_type):
    result = outcome(model_type)
    assert result.kind != "failed", result.detail
    if model_type in MUST_EDIT:
        assert result.kind == "exact", result
    if result.kind == "exact":
        assert result.suffix_only == (model_type not in WHOLE_ROW_TYPES), result
    if model_type in REFUSED_FOR_BLOCKS:
        assert result.kind == "refused" and REFUSED_FOR_BLOCKS[model_type] in result.detail, result
    if result.experts:  # the decided behaviour for mixtures of experts: a typed refusal that says so
        assert result.kind == "refused" and "mixture-of-experts" in result.detail, result


def test_the_published_family_table_is_this_run():
    published = FAMILIES_DOC.read_text()
    version = re.search(r"with transformers (\S+):", published).group(1)
    if version != transformers.__version__:
        pytest.skip(f"docs/families.md is for transformers {version}, this is {transformers.__version__}")
    assert published == "# Model families\n\n" + table(), "run python -m tests.families and commit docs/families.md"
