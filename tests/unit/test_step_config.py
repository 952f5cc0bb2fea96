"""Config keys of the training step: token budget, recompute, EMA dtype, sequence budget, vocab."""

from __future__ import annotations

import pytest

from rlp.config import ConfigError, load_config


def test_bundled_configs_validate_with_the_new_keys() -> None:
    paper = load_config("qwen3_1p7b_32xh100")
    assert paper.model.recompute == "full" and paper.model.vocab_size == 151_936
    assert paper.objective.max_tokens_per_micro_batch >= 171 + 2048 + 2048 + 3
    assert paper.data.manifest  # pipe: shards need an explicit manifest
    assert load_config("1gpu_smollm2_135m").model.recompute == "full"
    assert load_config().ema.dtype == "float32"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("objective.thought_micro_batch=16", "unknown config key 'objective.thought_micro_batch'"),
        ("model.recompute_activations=true", "unknown config key 'model.recompute_activations'"),
        ("model.recompute=yes", "model.recompute"),
        ("ema.dtype=bfloat16", "ema.dtype"),
        ("rollout.eos_in_thought=keep", "rollout.eos_in_thought"),
        ("objective.max_tokens_per_micro_batch=0", "objective.max_tokens_per_micro_batch"),
        ("model.vocab_size=0", "model.vocab_size"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_sequence_budget_names_every_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.max_position_embeddings=4096"])  # 2048 + 1 + 2048 + 1 + 1
    text = str(err.value)
    for key in (
        "data.max_prefix_tokens=2048",
        "rollout.max_thought_tokens=2048",
        "reward.target_tokens=1",
        "model.max_position_embeddings=4096",
        "4099 positions",
    ):
        assert key in text
    assert "\n" not in text
    with pytest.raises(ConfigError, match="objective.max_tokens_per_micro_batch=4000"):
        load_config(None, ["objective.max_tokens_per_micro_batch=4000"])
    with pytest.raises(ConfigError, match="data.ntp_seq_len"):
        load_config(None, ["data.ntp_seq_len=9000"])
    load_config(None, ["model.max_position_embeddings=4099"])  # exactly enough
