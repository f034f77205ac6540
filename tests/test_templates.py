from alphaedit_fast import get_context_templates
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for


def test_templates_are_seeded_cached_and_well_formed():
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    first = get_context_templates(model, tok, seed=1)
    assert first[0] == ["{}"] and len(first[1]) == 5
    assert all(t.count("{}") == 1 and t.endswith(". {}") for t in first[1])
    assert get_context_templates(model, tok, seed=1, use_cache=False) == first  # reproducible
    first[1].append("mutated {}")
    assert len(get_context_templates(model, tok, seed=1)[1]) == 5  # the cache is not shared
    assert model.training is False


def test_snippets_start_with_the_original_prefixes():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    templates = get_context_templates(model, tok, seed=0)[1]
    for template, prefix in zip(templates, ["The", "Therefore", "Because", "I", "You"]):
        assert template.startswith(prefix)
