"""Options defined once: command-line flags generated from the config dataclasses
(septet.options), choices from their registries, and SEPTET_* variables read only in septet.env."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from septet import env, options
from septet.cli import build_parser, main, train_config

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the generator on its own

@dataclass
class _Base:
    steps: int = 10  # how many steps
    fast: bool = False  # go fast
    note: str = "base"  # only the base declares this


@dataclass
class _Config(_Base):
    steps: int = 20  # steps, as the subclass says
    name: str = (
        "x"  # a comment on a statement's last line
    )
    # a comment on its own line belongs to no field
    betas: tuple[float, ...] = (0.9, 0.95)
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    mode: Literal["a", "b"] = "a"
    path: Path | None = None
    ratio: float | None = None
    extra: dict[str, object] = field(default_factory=dict)
    on: bool = True  # 50% of the time


def _parser(cls=_Config, **kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    options.add_flags(p, cls, **kw)
    return p


def test_help_is_the_fields_trailing_comment_walking_the_mro():
    assert options.field_comments(_Config) == {
        "steps": "steps, as the subclass says", "fast": "go fast", "note": "only the base declares this",
        "name": "a comment on a statement's last line", "on": "50% of the time"}
    text = _parser().format_help()
    assert "only the base declares this" in text and "50% of the time" in text  # % survives argparse


def test_no_flags_give_the_dataclass_defaults():
    assert options.build(_Config, _parser().parse_args([])) == _Config()


def test_each_kind_of_field_parses_into_the_dataclass():
    args = _parser().parse_args(["--steps", "3", "--fast", "--note", "n", "--name", "y", "--betas", "0.8,0.99",
                                 "--sizes", "4,5,6", "--mode", "b", "--path", "a/b", "--ratio", "0.5",
                                 "--extra", "k=3", "--extra", "s=text", "--extra", 'j={"a": 1}', "--no-on"])
    assert options.build(_Config, args) == _Config(
        steps=3, fast=True, note="n", name="y", betas=(0.8, 0.99), sizes=[4, 5, 6], mode="b", path=Path("a/b"),
        ratio=0.5, extra={"k": 3, "s": "text", "j": {"a": 1}}, on=False)
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(["--mode", "c"])
    assert _Config().extra == {}  # the shared default was not filled in


def test_flag_adjustments_and_registry_choices():
    p = _parser(flags={"steps": options.Flag(aliases=("--n",), default=None, help="mine")},
                choices={"name": ("x", "y", "z")}, skip=("note",))
    args = p.parse_args(["--n", "7", "--name", "z"])
    assert (args.steps, args.name) == (7, "z")
    assert options.build(_Config, args, steps=args.steps or 1).steps == 7
    assert p.parse_args([]).steps is None and "mine" in p.format_help()
    with pytest.raises(argparse.ArgumentError):
        p.parse_args(["--name", "w"])
    assert "--note" not in p.format_help() and not hasattr(p.parse_args([]), "note")
    with pytest.raises(ValueError, match="no field"):
        _parser(flags={"nope": options.Flag()})


def test_a_field_type_with_no_flag_form_is_an_error():
    @dataclass
    class Odd:
        pair: tuple[int, str] = (1, "a")

    with pytest.raises(TypeError, match="pair"):
        _parser(Odd)


def test_building_the_parser_and_running_another_verb_does_not_import_torch():
    code = ("import sys; from septet.cli import build_parser; p = build_parser(); p.format_help(); "
            "p.parse_args(['env']); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          check=False)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ septet train / vlm train / train-clip

def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    for action in parser._actions:
        if flag in action.option_strings:
            return action
    raise AssertionError(f"no {flag}")


def _subparser(*verbs: str) -> options.LazyParser:
    parser = build_parser()
    for verb in verbs:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[verb]
    return parser.complete()


def _non_default_args(parser: argparse.ArgumentParser, f: dataclasses.Field, default) -> list[tuple[list[str], object]]:
    """Flags that should set field `f` to something other than `default`, each with the value
    expected in the built config."""
    action = _action(parser, options.option(f.name))
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [([flag if not default else "--no-" + flag[2:]], not default)]
    if action.choices:  # an alias of the default (float32 for fp32) is not a new value: try each
        return [([flag, str(c)], c) for c in action.choices if c != default]
    if action.type is int:
        return [([flag, "7"], 7)]
    if action.type is float:
        return [([flag, "0.375"], 0.375)]
    if action.type is Path:
        return [([flag, "some/dir"], Path("some/dir"))]
    if isinstance(action.default, dict):  # repeated KEY=VALUE
        return [([flag, "n_layer=3"], {"n_layer": 3})]
    return [([flag, "custom-text"], "custom-text")]


def _round_trip_every_field(cls, parser, base: list[str], build, verbs: list[str]):
    defaults = build(parser.parse_args(base))
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        reached = [expected for flags, expected in _non_default_args(parser, f, default)
                   if getattr(build(build_parser().parse_args([*verbs, *base, *flags])), f.name) == expected]
        assert reached, f"{options.option(f.name)} does not set {cls.__name__}.{f.name}"


def test_every_train_config_field_has_a_flag_that_reaches_it():
    from septet.train.loop import TrainConfig

    parser = _subparser("train")
    base = ["--model", "llama-tiny"]
    _round_trip_every_field(TrainConfig, parser, base, train_config, ["train"])
    tc = train_config(build_parser().parse_args(["train", *base]))
    assert tc == TrainConfig(model="llama-tiny", out=Path("runs/llama-tiny"))


def test_every_vlm_train_config_field_has_a_flag_that_reaches_it():
    from septet.vlm.commands import vlm_train_config
    from septet.vlm.train import VLMTrainConfig

    parser = _subparser("vlm", "train")
    base = ["--arch", "flamingo"]
    _round_trip_every_field(VLMTrainConfig, parser, base, vlm_train_config, ["vlm", "train"])
    built = vlm_train_config(build_parser().parse_args(["vlm", "train", "--arch", "blip2"]))
    assert built == VLMTrainConfig(arch="blip2", out=Path("runs/blip2"))


def test_every_clip_train_config_field_has_a_flag_that_reaches_it():
    from septet.vlm.clip_train import CLIPTrainConfig, clip_train_config

    parser = _subparser("train-clip")
    _round_trip_every_field(CLIPTrainConfig, parser, [], clip_train_config, ["train-clip"])
    assert clip_train_config(build_parser().parse_args(["train-clip"])) == CLIPTrainConfig()
    sized = clip_train_config(build_parser().parse_args(["train-clip", "--set", "vit_layers=6", "--json"]))
    assert (sized.vit_layers, sized.progress) == (6, False)


# every flag `septet train --help` listed before the flags were generated
OLD_TRAIN_FLAGS = ("--json", "--model", "--data", "--out", "--steps", "--batch-size", "--grad-accum", "--seq-len",
                   "--lr", "--optimizer", "--schedule", "--warmup", "--weight-decay", "--grad-clip", "--seed",
                   "--eval-every", "--eval-batches", "--ckpt-every", "--dtype", "--compile",
                   "--activation-checkpointing", "--resume", "--spike-factor", "--device", "--set", "--no-progress")
OLD_VLM_TRAIN_FLAGS = ("--arch", "--lm", "--vision", "--out", "--steps", "--stage1-steps", "--lr", "--stage1-lr",
                       "--warmup", "--schedule", "--weight-decay", "--seed", "--vqa-batch", "--caption-batch",
                       "--interleaved-batch", "--interleaved-images", "--answer-alpha", "--vqa-weight",
                       "--caption-weight", "--interleaved-weight", "--stage1-batch", "--n-latents",
                       "--resampler-layers", "--resampler-dim", "--xattn-every", "--ff-mult", "--gate-lr-mult",
                       "--qformer-dim", "--qformer-layers", "--n-query", "--eval-every", "--eval-questions",
                       "--ckpt-every", "--threads", "--resume", "--no-progress", "--json")
OLD_TRAIN_CLIP_FLAGS = ("--json", "--out", "--steps", "--batch-size", "--lr", "--warmup", "--weight-decay", "--seed",
                        "--train-images", "--eval-images", "--eval-every", "--ckpt-every", "--resume", "--set",
                        "--no-progress")


@pytest.mark.parametrize("verbs, old", [(("train",), OLD_TRAIN_FLAGS), (("vlm", "train"), OLD_VLM_TRAIN_FLAGS),
                                        (("train-clip",), OLD_TRAIN_CLIP_FLAGS)])
def test_every_flag_that_existed_still_does(verbs, old):
    parser = _subparser(*verbs)
    have = {s for a in parser._actions for s in a.option_strings}
    assert not set(old) - have


def test_old_style_train_flags_give_the_same_config():
    args = build_parser().parse_args([
        "train", "--model", "llama-tiny", "--compile", "--activation-checkpointing", "--resume", "--no-progress",
        "--set", "n_layer=4", "--set", "norm=rms", "--optimizer", "adafactor", "--dtype", "bf16", "--seq-len", "32"])
    tc = train_config(args)
    assert (tc.compile, tc.activation_checkpointing, tc.resume, tc.progress) == (True, True, True, False)
    assert tc.overrides == {"n_layer": 4, "norm": "rms"}
    assert (tc.optimizer, tc.dtype, tc.seq_len, tc.out) == ("adafactor", "bf16", 32, Path("runs/llama-tiny"))
    assert train_config(build_parser().parse_args(["train", "--model", "m", "--dtype", "bfloat16"])).dtype == "bf16"
    assert not train_config(build_parser().parse_args(["train", "--model", "m", "--json"])).progress
    with pytest.raises(SystemExit) as e:  # a --set without '=' fails at parse time, exit 2
        build_parser().parse_args(["train", "--model", "m", "--set", "n_layer"])
    assert e.value.code == 2


def test_choices_come_from_their_registries():
    from septet.api import DTYPES
    from septet.checkpoints.convert import TARGETS
    from septet.eval.metrics import MC_MODES
    from septet.inference.quant import MODES
    from septet.models import presets
    from septet.train.optim import OPTIMIZERS
    from septet.train.schedules import KINDS
    from septet.vlm.infer import ARCHS

    train = _subparser("train")
    assert tuple(_action(train, "--schedule").choices) == KINDS
    assert tuple(_action(train, "--dtype").choices) == tuple(DTYPES)
    assert tuple(_action(train, "--optimizer").choices) == OPTIMIZERS
    assert tuple(_action(_subparser("export"), "--to").choices) == TARGETS
    ev = _subparser("eval")
    assert (tuple(_action(ev, "--mode").choices), tuple(_action(ev, "--dtype").choices)) == (MC_MODES, tuple(DTYPES))
    assert all(name in _action(train, "--model").help for name in presets())
    for verb in ("chat", "generate", "serve"):
        p = _subparser(verb)
        assert tuple(_action(p, "--quant").choices) == ("auto", "none", *MODES)
        assert tuple(_action(p, "--dtype").choices) == tuple(DTYPES)
    vlm = _subparser("vlm", "train")
    assert (tuple(_action(vlm, "--arch").choices), tuple(_action(vlm, "--schedule").choices)) == (ARCHS, KINDS)


# ------------------------------------------------------------------ SEPTET_* variables

def test_septet_variables_are_read_only_in_env_py():
    read = re.compile(r"(environ|getenv)\b[^\n]*SEPTET_|SEPTET_\w*[\"']\s*in\s+os\.environ")
    offenders = []
    for path in sorted((ROOT / "septet").rglob("*.py")):
        if path == ROOT / "septet" / "env.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if read.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "read SEPTET_* through septet.env:\n" + "\n".join(offenders)


def test_readme_lists_every_variable():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert not [name for name in env.VARIABLES if f"`{name}`" not in readme]


def test_septet_env_prints_each_variable(monkeypatch, capsys):
    monkeypatch.setenv("SEPTET_KERNELS", "0")
    monkeypatch.delenv("SEPTET_OFFLINE", raising=False)
    assert main(["env", "--json"]) == 0
    import json

    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(env.VARIABLES)
    assert rows["SEPTET_KERNELS"]["value"] == "0" and rows["SEPTET_OFFLINE"]["value"] is None
    assert "C kernels" in rows["SEPTET_KERNELS"]["doc"]
    assert main(["env"]) == 0
    assert "SEPTET_KERNELS '0'" in capsys.readouterr().out
