from finetune.tokenizers import Message


def test_default_mask_trains_only_assistant() -> None:
    assert Message("system", "s").is_masked
    assert Message("user", "u").is_masked
    assert Message("ipython", "r").is_masked
    assert not Message("assistant", "a").is_masked


def test_explicit_mask_wins() -> None:
    assert Message("assistant", "a", masked=True).is_masked
    assert not Message("user", "u", masked=False).is_masked
