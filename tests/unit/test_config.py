"""Config loading, overrides, validation and the pinned key set."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rlp import config as C

REPO = Path(__file__).resolve().parents[2]

# Pinned on purpose: adding, renaming or removing a section or key must be a visible decision
# (update this test, rlp/configs/reference.yaml and the docs together). Renamed keys keep no alias.
SECTIONS = (
    "run",
    "model",
    "tokenizer",
    "parallel",
    "data",
    "rollout",
    "reward",
    "objective",
    "ema",
    "optim",
    "checkpoint",
    "eval",
    "benefit",
    "log",
)


def test_top_level_sections_are_pinned():
    assert C.SECTIONS == SECTIONS


def test_key_set_matches_reference_yaml():
    """rlp/configs/reference.yaml is the generated all-keys file; it must match the dataclasses."""
    reference = (REPO / "rlp" / "configs" / "reference.yaml").read_text()
    assert reference == C.reference_yaml(), (
        "regenerate with: rlp config --reference > rlp/configs/reference.yaml"
    )


def test_every_field_has_a_docstring():
    for section in SECTIONS:
        cls = type(getattr(C.Config(), section))
        docs = C.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{section}: fields without docstring: {missing}"


def test_defaults_follow_the_paper():
    cfg = C.Config()
    assert cfg.rollout.num_thoughts == 16
    assert cfg.rollout.temperature == 0.7
    assert cfg.rollout.max_thought_tokens == 2048
    assert cfg.ema.decay == 0.999
    assert cfg.optim.lr == 1e-6 and cfg.optim.schedule == "constant"
    assert cfg.objective.kl_coef == 0.0 and cfg.objective.ntp_weight == 0.0
    assert cfg.reward.baseline_mode == "group_mean_loo" and not cfg.reward.std_scale
    assert cfg.reward.target_tokens == 1 and cfg.data.targets_per_document == 1


def test_unknown_key_names_key_and_closest():
    with pytest.raises(C.ConfigError, match=r"rollout\.num_thought'.*did you mean 'num_thoughts'"):
        C.load_config(None, ["rollout.num_thought=4"])


def test_unknown_section_names_closest():
    with pytest.raises(C.ConfigError, match=r"'rolout'.*did you mean 'rollout'"):
        C.from_dict({"rolout": {"num_thoughts": 4}})


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.num_thoughts=four", "expected an integer"),
        ("rollout.temperature=hot", "expected a number"),
        ("objective.rl_weight=true", "expected a number"),
        ("log.wandb=sometimes", "expected one of"),
        ("data.shuffle_shards=3", "expected true/false"),
        ("model.num_layers=2.5", "expected an integer"),
    ],
)
def test_mistyped_values_fail(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(None, [override])


def test_overrides_parse_yaml_scalars():
    cfg = C.load_config(
        None,
        [
            "rollout.num_thoughts=8",
            "rollout.temperature=1",
            "reward.reward_clip=null",
            "checkpoint.init_from=/x/y",
            "optim.lr=3e-4",
            "log.wandb=offline",
        ],
    )
    assert cfg.rollout.num_thoughts == 8
    assert cfg.rollout.temperature == 1.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.reward.reward_clip is None
    assert cfg.checkpoint.init_from == "/x/y"
    assert cfg.optim.lr == 3e-4
    assert cfg.log.wandb == "offline"


def test_bad_override_syntax():
    with pytest.raises(C.ConfigError, match="section.key=value"):
        C.load_config(None, ["rollout.num_thoughts"])
    with pytest.raises(C.ConfigError, match="must be section.key"):
        C.load_config(None, ["num_thoughts=3"])


def test_references_expand():
    cfg = C.load_config(None, ["run.name=abc", "run.output_dir=/tmp/r/${run.name}"])
    assert cfg.run.output_dir == "/tmp/r/abc"
    assert cfg.checkpoint.dir == "/tmp/r/abc/checkpoints"


def test_tp_must_divide_heads():
    with pytest.raises(C.ConfigError, match=r"parallel\.tp_size=3 does not divide"):
        C.load_config(None, ["parallel.tp_size=3"])


def test_cross_field_rules_name_the_key():
    with pytest.raises(C.ConfigError, match="rollout.num_thoughts must be >= 2"):
        C.load_config(None, ["rollout.num_thoughts=1"])
    with pytest.raises(C.ConfigError, match="nothing to train"):
        C.load_config(None, ["objective.rl_weight=0"])
    with pytest.raises(C.ConfigError, match="ema.enabled=false"):
        C.load_config(None, ["ema.enabled=false", "objective.kl_coef=0.1"])
    with pytest.raises(C.ConfigError, match="parallel.pp_size must be 1"):
        C.load_config(None, ["parallel.pp_size=2"])


def test_ema_needed_only_when_it_changes_the_gradient():
    assert not C.needs_ema(C.Config())
    assert C.needs_ema(C.load_config(None, ["reward.baseline_mode=ema_only"]))
    assert C.needs_ema(C.load_config(None, ["reward.reward_clip=2.0"]))


def test_missing_file_error(tmp_path):
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "path", sorted((REPO / "rlp" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_configs_load(path):
    if path.name == "reference.yaml":
        raw = yaml.safe_load(path.read_text())
        assert C.from_dict(raw).to_dict() == C.from_dict({}).to_dict()
        return
    cfg = C.load_config(path)
    assert cfg.run.name


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load_config(REPO / "rlp" / "configs" / "tiny_cpu.yaml", ["rollout.num_thoughts=6"])
    out = C.save_config(cfg, tmp_path / "run" / "config.yaml")
    again = C.load_config(out)
    assert again.to_dict() == cfg.to_dict()


def test_home_is_expanded_in_path_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = C.load_config(None, ["checkpoint.init_from=~/models/x", "run.name=~x"])
    assert cfg.checkpoint.init_from == f"{tmp_path}/models/x"
    assert cfg.run.name == "~x"  # not a path key: left alone


# Clear errors for bad files and values (issue 15, item 8), also under `rlp train --dry-run`.


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("run:\n  name: x\n  max_steps: [1\nmodel: {}\n", ":4:6: YAML syntax error"),
        ('run:\n  name: "x\n', ":3:1: YAML syntax error"),
        ("run:\n\tname: x\n", ":2:1: YAML syntax error"),
    ],
)
def test_yaml_syntax_error_names_file_and_line(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(C.ConfigError) as err:
        C.load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}{where}"), message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["", "\n# only a comment\n"])
def test_empty_config_file_is_an_error(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(C.ConfigError, match=f"config file {path} is empty"):
        C.load_config(path)


def test_non_mapping_and_unreadable_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- run\n")
    with pytest.raises(C.ConfigError, match="top level must be a mapping"):
        C.load_config(tmp_path / "list.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"run:\n  name: caf\xe9\n")
    with pytest.raises(C.ConfigError, match="not UTF-8"):
        C.load_config(tmp_path / "latin1.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=nan", "optim.lr must be a finite number"),
        ("optim.lr=.inf", "optim.lr must be a finite number"),
        ("optim.lr=-1e-3", "optim.lr must be >= 0"),
        ("rollout.temperature=nan", "rollout.temperature must be a finite number"),
        ("optim.eps=0", "optim.eps must be > 0"),
        ("optim.beta2=1", "optim.beta2 must be in [0, 1)"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
        ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
        ("optim.max_bad_steps=0", "optim.max_bad_steps must be >= 1"),
        ("checkpoint.save_every=-5", "checkpoint.save_every must be >= 0"),
        ("reward.reward_clip=0", "reward.reward_clip must be > 0"),
        ("reward.span_discount=0", "reward.span_discount must be in (0, 1]"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("model.max_position_embeddings=0", "model.max_position_embeddings must be >= 1"),
    ],
)
def test_value_checks(override, message):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(None, [override])
    assert str(err.value).startswith(message), str(err.value)


def test_value_checks_apply_to_dry_run(tmp_path):
    """`rlp train --dry-run` prints nothing for a bad value and says what to change."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "rlp.cli", "train", "--dry-run", "optim.lr=nan"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    error = proc.stderr.strip()
    assert error == "rlp train: config error: optim.lr must be a finite number, got nan"
