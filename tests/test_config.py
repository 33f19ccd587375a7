"""The run config: typed values, ranges and readable errors that name the key and what is valid."""

import shutil
from pathlib import Path

import pytest

from siasam_fast.config import Config, load_config
from siasam_fast.ds_config import finalize, load_ds_config

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "configs" / "synthetic.yaml"


def test_values_take_the_type_of_their_key():
    cfg = load_config(BASE, ["train.lr=1e-4", "data.dedup=false", "siamese.skg=no",
                             "train.batch_size=4", "siamese.alpha=1", "train.out_dir=123"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)  # YAML reads 1e-4 as a string
    assert cfg.data.dedup is False and cfg.siamese.skg is False
    assert cfg.train.batch_size == 4 and cfg.siamese.alpha == 1.0
    assert cfg.train.out_dir == "123"
    cfg = load_config(BASE, ["sampling.preroll_temperature=1e-3", "sampling.keyframe_max_shift=4",
                             "sampling.anchor_copies=false"])
    assert cfg.sampling.preroll_temperature == 1e-3 and cfg.sampling.keyframe_max_shift == 4
    assert cfg.sampling.anchor_copies is False
    assert load_config(BASE, ["sampling.preroll_temperature=null"]).sampling.preroll_temperature \
        is None


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=abc", "train.batch_size='abc': expected a whole number"),
    ("train.batch_size=1.5", "train.batch_size=1.5: expected a whole number"),
    ("train.lr=abc", "train.lr='abc': expected a finite number"),
    ("siamese.skg=maybe", "siamese.skg='maybe': expected true or false"),
    ("data.dedup=abc", "data.dedup='abc': expected true or false"),
    ("data.options=3", "data.options=3: expected a mapping"),
    ("train.epochs=0", "train.epochs=0: must be >= 1"),
    ("train.batch_size=0", "train.batch_size=0: must be >= 1"),
    ("train.lr=-1", "train.lr=-1.0: must be >= 0"),
    ("train.weight_decay=-1", "train.weight_decay=-1.0: must be >= 0"),
    ("train.warmup_ratio=5", "train.warmup_ratio=5.0: must lie in [0, 1]"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0: must be >= 0"),
    ("train.max_steps=-5", "train.max_steps=-5: must be >= 0"),
    ("train.log_every=0", "train.log_every=0: must be >= 1"),
    ("train.grad_accum=0", "train.grad_accum=0: must be >= 1 (micro-batches per optimizer step"),
    ("train.save_every=-1", "train.save_every=-1: must be >= 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0: must be >= 1"),
    ("train.early_stop=-1", "train.early_stop=-1: must be >= 0"),
    ("train.out_dir=", "train.out_dir is empty"),
    ("siamese.alpha=-1", "siamese.alpha=-1.0: must be >= 0"),
    ("model.grid_pool=0", "model.grid_pool=0: must be >= 1"),
    ("model.dropout=2", "model.dropout=2.0: must lie in [0, 1)"),
    ("data.max_question_len=0", "data.max_question_len=0: must be >= 3"),
    ("data.num_answers=0", "data.num_answers=0: must be >= 1"),
    ("data.image_size=0", "data.image_size=0: must be >= 8"),
    ("eval.split=foo", "eval.split='foo': valid values are val, test, none"),
    ("data.dataset=msrvtt", "data.dataset='msrvtt': valid values are "),
    ("data.format=jsonl", "data.format='jsonl': valid values for data.dataset="),
    ("eval.num_clips=0", "eval.num_clips=0: must be >= 1"),
    ("eval.batch_size=0", "eval.batch_size=0: must be >= 1"),
    ("train.lr=inf", "train.lr='inf': expected a finite number"),
    ("train.lr=.inf", "train.lr=inf: expected a finite number"),
    ("siamese.alpha=nan", "siamese.alpha='nan': expected a finite number"),
    ("train.seed=-1", "train.seed=-1: must be >= 0"),
    ("sampling.num_clips=0", "sampling.num_clips=0: must be an integer >= 1"),
    ("sampling.num_clips=true", "sampling.num_clips=True: expected a whole number"),
    ("sampling.frames_per_clip=true", "sampling.frames_per_clip=True: must be an integer"),
    ("sampling.anchor_copies=maybe", "sampling.anchor_copies='maybe': expected true or false"),
    ("sampling.eval_clips=4", "sampling.eval_clips=4: a run's clips per video at evaluation are "
     "set by eval.num_clips"),
])
def test_bad_values_name_the_key_and_what_is_valid(override, message):
    with pytest.raises(ValueError) as err:
        load_config(BASE, [override])
    assert message in str(err.value)


def test_early_stop_needs_an_evaluation():
    with pytest.raises(ValueError, match=r"train.early_stop=2 needs an evaluation after each "
                                         r"epoch: set eval.split to val or test"):
        load_config(BASE, ["train.early_stop=2", "eval.split=none"])
    assert load_config(BASE, ["train.early_stop=2"]).train.early_stop == 2


def test_count_refuses_an_aggregation_of_class_scores():
    with pytest.raises(ValueError, match=r"eval.aggregation=logsumexp: task=count predicts a "
                                         r"number .* valid for count: mean, max"):
        load_config(BASE, ["task=count", "eval.aggregation=logsumexp"])
    assert load_config(BASE, ["task=count", "eval.aggregation=max"]).eval.aggregation == "max"


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) > 5
    for path in configs:
        load_config(path)


def test_bad_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML: "):
        load_config(bad)
    flat = tmp_path / "flat.yaml"
    flat.write_text("train: 5\n")
    with pytest.raises(ValueError, match=r"flat.yaml: section 'train' must be a mapping of keys"):
        load_config(flat, ["train.max_steps=1"])
    with pytest.raises(ValueError, match=r"is a folder"):
        load_config(tmp_path)
    listing = tmp_path / "ds.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"must hold a JSON object of settings, got a list"):
        load_ds_config(str(listing))
    broken = tmp_path / "broken.json"
    broken.write_text("{'a': 1}")
    with pytest.raises(ValueError, match=r"broken.json' is not valid JSON"):
        load_ds_config(str(broken))
    adam = tmp_path / "adam.json"
    adam.write_text('{"optimizer": {"type": "Adam"}}')
    with pytest.raises(ValueError, match=r"has an 'optimizer' block, which siasam-fast does not"):
        load_ds_config(str(adam))
    with pytest.raises(ValueError, match=r"zero_optimization.stage=7: valid stages are 0, 1, 2, 3"):
        finalize({"zero_optimization": {"stage": 7}}, 4, 1.0, 1)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps='abc': must be a whole"):
        finalize({"gradient_accumulation_steps": "abc"}, 4, 1.0, 1)


def test_model_folders_are_checked_before_loading(tmp_path):
    from siasam_fast.config import ModelConfig
    from siasam_fast.model import build_text, build_visual, load_tokenizer

    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"model.tokenizer=.*holds none of tokenizer.json, vocab"):
        load_tokenizer(ModelConfig(tokenizer=str(tmp_path)))
    with pytest.raises(ValueError, match=r"model.visual=.*holds none of model.safetensors"):
        build_visual(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model.text=.*could not load it as a BertModel"):
        build_text(str(tmp_path), 100, 0.1)
    # A complete checkpoint of another kind is refused too (transformers would build the model
    # with random weights where the checkpoint has none, and say so only in its log).
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    with pytest.raises(ValueError, match=r"model.visual=.*not a ResNetModel checkpoint: its "
                       r"config is a 'bert' model, not 'resnet'"):
        build_visual(str(bert))


def test_a_checkpoint_older_than_a_config_field_stays_compatible():
    """A run saved before a field existed (here data.min_answer_count) resumes: its config is
    compared with today's defaults filled in, not with the field missing."""
    import json

    from siasam_fast.training import config_mismatches, saved_config

    cfg = Config()
    old = json.loads(json.dumps(cfg.to_dict()))
    del old["data"]["min_answer_count"]
    assert config_mismatches(old, cfg.to_dict())  # what the raw comparison said
    assert config_mismatches(saved_config({"config": old}), cfg.to_dict()) == []
    changed = json.loads(json.dumps(cfg.to_dict()))
    changed["model"]["visual"] = "resnet50"
    assert config_mismatches(saved_config({"config": changed}), cfg.to_dict()) == [
        "model.visual: checkpoint has 'resnet50', this run has 'tiny'"]


def test_a_checkpoint_from_before_model_qa_head_keeps_its_head(tmp_path):
    """Runs saved before model.qa_head trained siasam's head: their config reads so, and it is the
    same model as today's auto wherever auto picks siasam's; where auto picks ClipBERT's (a
    converted folder), the difference is named with what auto means there."""
    import json

    from siasam_fast.config import config_from_json
    from siasam_fast.training import config_mismatches, saved_config

    cfg = Config()
    old = json.loads(json.dumps(cfg.to_dict()))
    del old["model"]["qa_head"]
    assert config_from_json(json.dumps(old)).model.qa_head == "siasam"
    assert config_mismatches(saved_config({"config": old}), cfg.to_dict()) == []
    converted = tmp_path / "clipbert-visual"
    converted.mkdir()
    (converted / "siasam_visual.json").write_text("{}")
    old["model"]["visual"] = cfg.model.visual = str(converted)
    assert config_mismatches(saved_config({"config": old}), cfg.to_dict()) == [
        "model.qa_head: checkpoint has 'siasam', this run has 'auto' (this run's auto is "
        "'clipbert' there; --set model.qa_head=siasam for the checkpoint's)"]
    cfg.model.qa_head = "siasam"  # what the README says to set
    assert config_mismatches(saved_config({"config": old}), cfg.to_dict()) == []
    # an explicit value and the auto that picks it are the same model, both ways
    new = json.loads(json.dumps(cfg.to_dict()))
    new["model"]["qa_head"], cfg.model.qa_head = "auto", "clipbert"
    assert config_mismatches(new, cfg.to_dict()) == []


def test_auto_fields_resolve_in_each_sides_folder(tmp_path, capsys):
    """model.qa_head / visual_head / cnn_freeze: auto is resolved in the checkpoint's model.visual
    for the checkpoint and in this run's for this run; where the checkpoint's folder is gone, in
    the folder that stands in for it (a ClipBERT run's auto picked ClipBERT's there too)."""
    import json

    from siasam_fast.training import config_mismatches, saved_config

    converted, plain = tmp_path / "clipbert-visual", tmp_path / "plain"
    converted.mkdir()
    (converted / "siasam_visual.json").write_text("{}")
    plain.mkdir()
    cfg = Config()
    saved = json.loads(json.dumps(cfg.to_dict()))
    saved["model"]["visual"] = str(converted)
    cfg.model.visual = str(plain)
    # another folder: model.visual differs; auto == auto is no difference of its own
    assert config_mismatches(saved_config({"config": saved}), cfg.to_dict()) == [
        f"model.visual: checkpoint has {str(converted)!r}, this run has {str(plain)!r}"]
    # the checkpoint's auto resolves in its own folder, not in this run's
    cfg.model.qa_head = "siasam"
    assert config_mismatches(saved_config({"config": saved}), cfg.to_dict())[0] == (
        "model.qa_head: checkpoint has 'auto', this run has 'siasam' (the checkpoint's auto is "
        "'clipbert' there; --set model.qa_head=clipbert for the checkpoint's)")
    # the checkpoint's folder moved: the copy stands in, and auto means what it meant there
    saved["model"]["visual"] = str(tmp_path / "moved-away")
    cfg = Config()
    cfg.model.visual = str(converted)
    cfg.model.qa_head, cfg.model.visual_head, cfg.model.cnn_freeze = (
        "clipbert", "clipbert", "detectron2")
    assert config_mismatches(saved_config({"config": saved}), cfg.to_dict()) == []
    assert "moved-away' is not here" in capsys.readouterr().err
    cfg.model.qa_head = "siasam"  # another head than the checkpoint's auto picked: named
    assert config_mismatches(saved_config({"config": saved}), cfg.to_dict()) == [
        "model.qa_head: checkpoint has 'auto', this run has 'siasam' (the checkpoint's auto is "
        "'clipbert' there; --set model.qa_head=clipbert for the checkpoint's)"]


def test_evaluation_settings_may_differ_from_the_checkpoints():
    """`siasam-fast eval --set sampling.eval_placement=uniform` (and `ask`) used to be refused as
    a checkpoint that "does not fit this config", though the placement of the evaluation clips,
    like eval.num_clips and eval.aggregation, changes no weight and nothing of training."""
    import json

    from siasam_fast.training import config_mismatches, saved_config

    cfg = Config()
    changed = json.loads(json.dumps(cfg.to_dict()))
    changed["sampling"]["eval_placement"] = "uniform"
    changed["eval"].update(num_clips=4, aggregation="max")
    assert config_mismatches(saved_config({"config": changed}), cfg.to_dict()) == []
    changed["sampling"]["stride"] = cfg.sampling.stride + 1  # training's clips: still refused
    assert [p.split(":")[0] for p in config_mismatches(changed, cfg.to_dict())] == [
        "sampling.stride"]


def test_clipbert_comparison_settings_resume_or_not():
    """eval.count_metric and train.keep_best change no weight: a resume or an evaluation may set
    them. The answer head, the mc loss and the mc text are what the model learned with: refused
    on resume (an evaluation may change data.mc_text, with a note). Bad values are named."""
    import json

    from siasam_fast.training import config_mismatches, model_visual_note, saved_config

    cfg = Config.from_dict({"task": "mc"})
    changed = json.loads(json.dumps(cfg.to_dict()))
    changed["eval"]["count_metric"], changed["train"]["keep_best"] = "raw", False
    assert config_mismatches(saved_config({"config": changed}), cfg.to_dict()) == []
    changed = json.loads(json.dumps(cfg.to_dict()))
    changed["model"]["qa_head"], changed["siamese"]["mc_loss"] = "clipbert", "ce"
    changed["data"]["mc_text"] = "joined"
    assert [p.split(":")[0] for p in config_mismatches(saved_config({"config": changed}),
                                                       cfg.to_dict())] == [
        "data.mc_text", "model.qa_head", "siamese.mc_loss"]
    for key, value, valid in (("siamese.mc_loss", "bce", "hinge, ce"),
                              ("data.mc_text", "both", "pair, joined"),
                              ("eval.count_metric", "round", "tgif, raw")):
        section, field = key.split(".")
        with pytest.raises(ValueError, match=f"{key}={value!r}: valid values are {valid}"):
            Config.from_dict({section: {field: value}})
    # the start-up line says which answer head trains when it is not siasam's
    assert model_visual_note(Config()) is None
    cfg = Config()
    cfg.model.qa_head = "clipbert"
    assert "; answer head clipbert (ClipBERT's: Linear, ReLU, Linear) (" in model_visual_note(cfg)
    # and when the CNN's freezing or head is not the default; frames unlike ClipBERT's are named
    cfg = Config()
    cfg.model.cnn_freeze = "batchnorm"
    assert "visual head proj; the CNN's BatchNorms are frozen; answer head siasam (" in \
        model_visual_note(cfg)
    cfg = Config()
    cfg.model.visual_head, cfg.data.frame_fit, cfg.data.image_size = "clipbert", "pad", 448
    assert model_visual_note(cfg).endswith("model.qa_head=auto)")
    cfg.data.frame_fit = "crop"
    assert model_visual_note(cfg).endswith(
        "; frames: data.frame_fit=crop, data.image_size=448 (ClipBERT's: pad at 448, or 768 on "
        "TGIF-QA)")


def test_a_v100_gets_fp16_not_emulated_bf16(monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulation and says True on a V100: bf16 was chosen
    there, and bf16 configs were accepted. The compute capability decides now."""
    import torch

    from siasam_fast import ds_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert not ds_config.has_bf16() and ds_config.default_precision() == "fp16"
    with pytest.raises(ValueError, match="Tesla V100-SXM2-32GB has no bf16"):
        finalize(ds_config.make_ds_config(2, "bf16"), 4, 1.0, 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert ds_config.has_bf16() and ds_config.default_precision() == "bf16"


def test_the_v100_bf16_refusal_names_train_precision_too(monkeypatch):
    """train.precision=bf16 replaces the precision of any DeepSpeed file, the fp16 one that the
    refusal advised included: taking that advice alone gave the same refusal. It names
    train.precision too."""
    import torch

    from siasam_fast import ds_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    advised = ds_config.load_ds_config("configs/ds/zero2_fp16.json", "bf16")
    with pytest.raises(ValueError, match=r"zero2_fp16\.json.*train\.precision"):
        finalize(advised, 4, 1.0, 1)
    assert ds_config.precision_of(ds_config.load_ds_config("configs/ds/zero2_fp16.json",
                                                           "auto")) == "fp16"


def test_deepspeed_config_spellings_and_batch_settings(tmp_path):
    import json

    from siasam_fast.ds_config import precision_of

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bfloat16": {"enabled": True}}))
    config = load_ds_config(str(old))
    assert precision_of(config) == "bf16" and "bfloat16" not in config
    assert precision_of(load_ds_config(str(old), precision="fp32")) == "fp32"
    final = finalize(config, 4, 1.0, 2)
    assert final["bf16"] == {"enabled": True} and final["train_batch_size"] == 8
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4, but train.grad_accum=1: "
                                         r"the run config sets the accumulation; use --set "
                                         r"train.grad_accum=4"):
        finalize({"gradient_accumulation_steps": 4}, 4, 1.0, 1)
    with pytest.raises(ValueError, match=r"train_batch_size=256, but train.batch_size=8 per "
                                         r"process x 8 process\(es\) x train.grad_accum=1 is 64"):
        finalize({"train_batch_size": 256}, 8, 1.0, 8)
    assert finalize({"train_batch_size": 64}, 8, 1.0, 8)["train_batch_size"] == 64
    # train.grad_accum sets DeepSpeed's accumulation and the effective batch; a file may repeat it
    for file_value in (1, 4):
        final = finalize({"gradient_accumulation_steps": file_value}, 8, 1.0, 2, grad_accum=4)
        assert final["gradient_accumulation_steps"] == 4 and final["train_batch_size"] == 64
        assert final["train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(ValueError, match=r"train_batch_size=16, .* x train.grad_accum=4 is 64"):
        finalize({"train_batch_size": 16}, 8, 1.0, 2, grad_accum=4)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2, but train.grad_accum=4"):
        finalize({"gradient_accumulation_steps": 2}, 8, 1.0, 2, grad_accum=4)


SYNC_COUNT = """
import torch
from siasam_fast.training import init_distributed  # DeepSpeed's CPU accelerator, gloo
from siasam_fast.ds_config import finalize, load_ds_config
import deepspeed
from deepspeed.accelerator import get_accelerator

init_distributed()
accelerator, calls = get_accelerator(), []
real = accelerator.synchronize
accelerator.synchronize = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
for default in (True, False):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    config = finalize(load_ds_config(None, "bf16", stage=2), 2, 1.0, 1)
    if default:
        del config["timers"]  # DeepSpeed's own default
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    for _ in range(4):  # the timer synchronises from the third step on
        calls.clear()
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    print("syncs", len(calls))
"""


@pytest.mark.slow
def test_deepspeeds_throughput_timer_does_not_synchronise_every_step():
    """DeepSpeed's throughput timer (on by default) synchronises the device when each forward
    starts and each step ends; finalize turns it off unless the file sets it."""
    import subprocess
    import sys

    from subprocess_env import cpu_env

    assert finalize({}, 4, 1.0, 1)["timers"] == {"throughput": {"enabled": False}}
    own = {"throughput": {"enabled": True, "synchronized": False}}
    assert finalize({"timers": own}, 4, 1.0, 1)["timers"] == own
    out = subprocess.run([sys.executable, "-c", SYNC_COUNT], capture_output=True, text=True,
                         env=cpu_env(), timeout=170, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line for line in out.stdout.splitlines() if line.startswith("syncs")] == [
        "syncs 2", "syncs 0"], out.stdout[-2000:]


def test_fused_adam_that_cannot_be_built_falls_back_to_torch_adamw(monkeypatch, capsys):
    import deepspeed.ops.adam
    import torch

    from siasam_fast.training import build_optimizer

    def no_build(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(deepspeed.ops.adam, "FusedAdam", no_build)
    model = torch.nn.Linear(3, 2)
    cfg = Config()
    optimizer, name = build_optimizer(model, cfg, torch.device("cuda"))
    assert name == "torch AdamW" and isinstance(optimizer, torch.optim.AdamW)
    assert "FusedAdam could not be built here (Ninja is required" in capsys.readouterr().err
    cfg.train.optimizer = "deepspeed"
    with pytest.raises(ValueError, match=r"train.optimizer='deepspeed': .* use "
                                         r"train.optimizer=torch"):
        build_optimizer(model, cfg, torch.device("cuda"))


def test_an_arch_list_without_this_gpu_is_no_fused_adam(monkeypatch, capsys):
    """DeepSpeed builds FusedAdam for TORCH_CUDA_ARCH_LIST, not for the GPU present: on a V100
    (sm_70) with "8.0;9.0" (a cluster's A100 / H100 setting) the build succeeds and the first
    optimizer step fails ('no kernel image'). train.optimizer=auto takes torch AdamW, saying
    why; an explicit 'deepspeed' stops with it. (torch.cuda stands in for a V100.)"""
    import deepspeed.ops.adam
    import torch

    from siasam_fast.training import build_optimizer

    built = []
    monkeypatch.setattr(deepspeed.ops.adam, "FusedAdam", lambda *a, **k: built.append(1))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    model, cfg = torch.nn.Linear(3, 2), Config()
    optimizer, name = build_optimizer(model, cfg, torch.device("cuda", 0))
    assert name == "torch AdamW" and isinstance(optimizer, torch.optim.AdamW) and not built
    assert ("FusedAdam could not be built here (TORCH_CUDA_ARCH_LIST='8.0;9.0', which it is "
            "built for, has no code for this GPU (sm_70): unset it or add 7.0)"
            in capsys.readouterr().err)
    cfg.train.optimizer = "deepspeed"
    with pytest.raises(ValueError, match=r"no code for this GPU \(sm_70\)"):
        build_optimizer(model, cfg, torch.device("cuda", 0))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0;8.0")  # covered: FusedAdam as before
    assert build_optimizer(model, cfg, torch.device("cuda", 0))[1] == "DeepSpeed FusedAdam"
    assert built == [1]


def test_shipped_configs_are_found_from_any_folder(tmp_path, monkeypatch):
    """`--config configs/synthetic.yaml` / `--deepspeed_config configs/ds/...` (the README's
    commands) read the configs shipped with the package when the working folder has none (an
    installed wheel, used outside the repository); a file in the working folder comes first."""
    from siasam_fast import paths

    monkeypatch.chdir(tmp_path)
    assert load_config("configs/synthetic.yaml").train.out_dir == "runs/synthetic"
    assert load_ds_config("configs/ds/zero3_fp32.json")["zero_optimization"]["stage"] == 3
    with pytest.raises(FileNotFoundError, match="'configs/nope.yaml' does not exist"):
        load_config("configs/nope.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "synthetic.yaml").write_text("train:\n  out_dir: mine\n")
    assert load_config("configs/synthetic.yaml").train.out_dir == "mine"
    # installed from a wheel: siasam_fast/configs/, and no checkout beside the package
    installed = tmp_path / "site" / "configs"
    shutil.copytree(ROOT / "configs", installed)
    monkeypatch.setattr(paths, "PACKAGE_CONFIGS", installed)
    monkeypatch.setattr(paths, "CHECKOUT_CONFIGS", tmp_path / "no-checkout")
    assert paths.shipped_config("configs/ds/zero2_fp32.json") == installed / "ds/zero2_fp32.json"
    assert paths.packaged_config("demo.yaml") == installed / "demo.yaml"


def test_the_installed_configs_come_before_the_checkouts(tmp_path, monkeypatch):
    from siasam_fast import paths

    installed, checkout = tmp_path / "installed", tmp_path / "checkout"
    for folder in (installed, checkout):
        (folder / "ds").mkdir(parents=True)
        (folder / "demo.yaml").write_text(folder.name)
    monkeypatch.setattr(paths, "PACKAGE_CONFIGS", installed)
    monkeypatch.setattr(paths, "CHECKOUT_CONFIGS", checkout)
    assert paths.packaged_config("demo.yaml") == installed / "demo.yaml"
    (installed / "demo.yaml").unlink()
    assert paths.packaged_config("demo.yaml") == checkout / "demo.yaml"
    assert paths.packaged_config("ds/none.json") == checkout / "ds/none.json"  # missing


def test_wheel_holds_every_config(monkeypatch):
    """setup.py installs configs/ as siasam_fast/configs/, every file of it (what
    paths.PACKAGE_CONFIGS reads in an installed wheel)."""
    import fnmatch
    import runpy

    import setuptools

    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    runpy.run_path(str(ROOT / "setup.py"))
    assert "siasam_fast.configs" in seen["packages"]
    assert seen["package_dir"]["siasam_fast.configs"] == "configs"
    patterns = seen["package_data"]["siasam_fast.configs"]
    files = [p.relative_to(ROOT / "configs").as_posix()
             for p in (ROOT / "configs").rglob("*") if p.is_file()]
    assert files and all(any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/")
                             for pat in patterns) for f in files), (files, patterns)


def test_adam_hyperparameters_reach_every_optimizer(monkeypatch):
    """train.adam_beta1 / adam_beta2 / adam_eps go to torch AdamW and to the fused optimizers
    (DeepSpeed's FusedAdam checked through a stand-in that records its arguments); the dataset
    configs carry ClipBERT's fine-tuning values; bad values are named."""
    import deepspeed.ops.adam
    import torch

    from siasam_fast.training import build_optimizer

    cfg = load_config(ROOT / "configs" / "msrvtt_qa.yaml")
    t = cfg.train
    assert (t.lr, t.weight_decay, t.adam_beta1, t.adam_beta2, t.adam_eps, t.grad_clip) == (
        5e-5, 1e-3, 0.9, 0.98, 1e-6, 5.0)
    model = torch.nn.Linear(3, 2)
    optimizer, _ = build_optimizer(model, cfg, torch.device("cpu"))
    assert {(g["betas"], g["eps"], g["lr"]) for g in optimizer.param_groups} == {
        ((0.9, 0.98), 1e-6, 5e-5)}
    seen = {}

    def fused(groups, **kwargs):
        seen.update(kwargs)
        return torch.optim.AdamW(groups, lr=kwargs["lr"])

    monkeypatch.setattr(deepspeed.ops.adam, "FusedAdam", fused)
    cfg.train.optimizer = "deepspeed"
    build_optimizer(model, cfg, torch.device("cuda"))
    assert seen == {"lr": 5e-5, "betas": (0.9, 0.98), "eps": 1e-6, "adam_w_mode": True}
    default = Config().train
    assert (default.adam_beta1, default.adam_beta2, default.adam_eps) == (0.9, 0.999, 1e-8)
    with pytest.raises(ValueError, match=r"train.adam_beta2=1.0: must lie in \[0, 1\)"):
        load_config(None, ["train.adam_beta2=1.0"])
    with pytest.raises(ValueError, match=r"train.adam_eps=0.0: must be > 0"):
        load_config(None, ["train.adam_eps=0"])


def test_weight_decay_leaves_biases_and_norms_out_and_frozen_weights_are_not_optimized():
    """build_optimizer's two AdamW groups: train.weight_decay for the matrices, none for biases,
    norms' weights and other 1-d parameters; frozen parameters are in neither."""
    import torch

    from siasam_fast.training import build_optimizer

    model = torch.nn.Module()
    model.proj, model.LayerNorm = torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)
    model.theta1 = torch.nn.Parameter(torch.ones(3))
    model.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    cfg = Config()
    cfg.train.weight_decay = 0.25
    optimizer, _ = build_optimizer(model, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    assert [(sorted(names[id(p)] for p in g["params"]), g["weight_decay"])
            for g in optimizer.param_groups] == [
        (["proj.weight"], 0.25),
        (["LayerNorm.bias", "LayerNorm.weight", "proj.bias", "theta1"], 0.0)]
    cfg.train.optimizer = "deepspeed"
    with pytest.raises(ValueError, match=r"train.optimizer='deepspeed' \(FusedAdam\) needs CUDA; "
                                         r"use 'torch' on CPU"):
        build_optimizer(model, cfg, torch.device("cpu"))


def test_a_model_folder_written_relative_or_absolute_is_the_same_model(tmp_path, monkeypatch):
    """`siasam-fast weights` prints absolute folders, the docs' recipe relative ones: a run
    started with one and continued (or init_from, eval) with the other names the same folders,
    not another model; a different folder still is one."""
    from siasam_fast.training import config_mismatches

    for name in ("clipbert-visual", "clipbert-text", "other"):
        (tmp_path / "weights" / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    saved = Config().to_dict()
    saved["model"].update(visual=str(tmp_path / "weights" / "clipbert-visual"),
                          text=str(tmp_path / "weights" / "clipbert-text"))
    now = Config().to_dict()
    now["model"].update(visual="weights/clipbert-visual", text="weights/clipbert-text/")
    assert config_mismatches(saved, now) == []
    now["model"]["visual"] = "weights/other"
    assert config_mismatches(saved, now) == [
        f"model.visual: checkpoint has '{tmp_path}/weights/clipbert-visual', this run has "
        "'weights/other'"]


def test_a_model_folder_that_moved_is_replaced_with_a_note(tmp_path, monkeypatch, capsys):
    """The checkpoint's weights folder is gone (moved, or the run copied to another machine):
    another existing folder stands in for it, with a note; a folder that is still there is
    another model, and a stand-in that does not exist is refused."""
    from siasam_fast.training import config_mismatches

    (tmp_path / "moved" / "clipbert-visual").mkdir(parents=True)
    (tmp_path / "old" / "clipbert-visual").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    saved = Config().to_dict()
    saved["model"]["visual"] = str(tmp_path / "gone" / "clipbert-visual")
    now = Config().to_dict()
    now["model"]["visual"] = "moved/clipbert-visual"
    assert config_mismatches(saved, now) == []
    assert "the checkpoint's folder" in capsys.readouterr().err
    now["model"]["visual"] = "nowhere/clipbert-visual"
    assert len(config_mismatches(saved, now)) == 1
    saved["model"]["visual"] = str(tmp_path / "old" / "clipbert-visual")  # still there
    now["model"]["visual"] = "moved/clipbert-visual"
    assert len(config_mismatches(saved, now)) == 1


def test_evaluating_with_other_frames_than_trained_says_so(tmp_path, capsys):
    """eval / ask with another data.frame_fit or data.image_size than the checkpoint's: allowed
    (the weights fit), with a note naming both values."""
    import json

    from siasam_fast.training import checkpoint_config

    tag = tmp_path / "run" / "checkpoints" / "step1"
    tag.mkdir(parents=True)
    saved = Config().to_dict()
    saved["data"]["frame_fit"] = "pad"
    (tag / "run_state.json").write_text(json.dumps(
        {"step": 1, "epoch": 0, "sampler": {}, "config": saved, "vocab": "", "world_size": 1}))
    (tag.parent / "latest").write_text("step1")
    checkpoint_config(str(tag), overrides=["data.frame_fit=crop", "data.image_size=32"])
    err = capsys.readouterr().err
    assert "data.frame_fit: checkpoint has 'pad', this run has 'crop'" in err
    assert "data.image_size: checkpoint has 224, this run has 32" in err
    checkpoint_config(str(tag), overrides=["data.mc_text=joined"])
    assert ("the input is prepared otherwise than in training (allowed, but the model did not "
            "learn on it): data.mc_text: checkpoint has 'pair', this run has 'joined'") in (
        capsys.readouterr().err)
    checkpoint_config(str(tag))
    assert "prepared otherwise" not in capsys.readouterr().err


def test_shipped_deepspeed_files_are_what_the_module_writes(tmp_path):
    """configs/ds/*.json are make_ds_config's output (write_all regenerates them), with the
    documented fp16 loss scaling and the ZeRO sections of each stage."""
    import json

    from siasam_fast.ds_config import FP16_DYNAMIC, make_ds_config, write_all

    written = write_all(tmp_path)
    shipped = sorted(p.name for p in (ROOT / "configs" / "ds").glob("*.json"))
    assert sorted(p.name for p in written) == shipped and len(shipped) == 11
    assert "zero0_fp16.json" not in shipped  # (DeepSpeed's ZeRO-0 fp16 updates are wrong)
    for path in written:
        assert path.read_text() == (ROOT / "configs" / "ds" / path.name).read_text(), path.name
    # fp16: dynamic loss scaling from 2**16, halved on overflow after one tolerated (hysteresis
    # 2), doubled after 1000 clean steps, never below 1
    assert FP16_DYNAMIC == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                            "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    buckets = {"overlap_comm": True, "contiguous_gradients": True,
               "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
    stage3 = {"stage3_prefetch_bucket_size": 50_000_000,
              "stage3_param_persistence_threshold": 100_000}
    for stage, zero in ((0, {"stage": 0}), (1, {"stage": 1, **buckets}),
                        (2, {"stage": 2, **buckets}), (3, {"stage": 3, **buckets, **stage3})):
        for precision in ("fp16", "bf16", "fp32"):
            config = make_ds_config(stage, precision, micro_batch=3, grad_clip=0.5)
            assert config["zero_optimization"] == zero
            assert config["fp16"] == (FP16_DYNAMIC if precision == "fp16" else {"enabled": False})
            assert config["bf16"] == {"enabled": precision == "bf16"}
            assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
                    config["gradient_clipping"]) == (3, 1, 0.5)
            assert config["zero_allow_untested_optimizer"] is True
            assert json.loads(json.dumps(config)) == config
    with pytest.raises(ValueError, match=r"ZeRO stage 4: valid stages are 0, 1, 2, 3"):
        make_ds_config(4, "fp32")
    with pytest.raises(ValueError, match=r"precision 'fp8': valid values are fp16, bf16, fp32"):
        make_ds_config(2, "fp8")


def test_fp16_with_zero_stage_0_is_refused(monkeypatch):
    """DeepSpeed 0.19's engine.backward() scales the loss for its ZeRO optimizers only; under
    ZeRO-0 its fp16 optimizer still divides the gradients by the loss scale, so every update was
    65536 times too small (tests/test_grad_accum.py measures it). A V100 gets the refusal with
    the configs that work; fp16 under ZeRO 1-3 and ZeRO-0 in bf16 / fp32 are accepted."""
    import torch

    from siasam_fast import ds_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    for config in (ds_config.make_ds_config(0, "fp16"), {"fp16": dict(ds_config.FP16_DYNAMIC)},
                   ds_config.load_ds_config("configs/ds/zero0_fp32.json", "fp16")):
        with pytest.raises(ValueError, match=r"fp16 with ZeRO stage 0: .*65536.*"
                                             r"configs/ds/zero2_fp16\.json"):
            finalize(config, 4, 1.0, 1)
    for stage in (1, 2, 3):
        assert ds_config.precision_of(finalize(ds_config.make_ds_config(stage, "fp16"), 4, 1.0,
                                               1)) == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    for precision in ("bf16", "fp32"):
        assert ds_config.precision_of(finalize(ds_config.make_ds_config(0, precision), 4, 1.0,
                                               1)) == precision


@pytest.mark.parametrize("capability, name, bf16", [
    ((7, 0), "Tesla V100-SXM2-32GB", False), ((7, 5), "Tesla T4", False),
    ((8, 0), "NVIDIA A100-SXM4-80GB", True), ((8, 6), "NVIDIA A10", True),
    ((9, 0), "NVIDIA H100 80GB HBM3", True)])
def test_precision_follows_the_compute_capability(monkeypatch, capability, name, bf16):
    """bf16 from sm_80 (Ampere) on, sm_80 itself included; fp16 below; fp32 without a GPU."""
    import torch

    from siasam_fast import ds_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert ds_config.has_bf16() is bf16
    assert ds_config.default_precision() == ("bf16" if bf16 else "fp16")
    assert ds_config.precision_of(load_ds_config(None)) == ("bf16" if bf16 else "fp16")
    for precision in ("fp16", "fp32", "bf16"):
        config = ds_config.make_ds_config(2, precision)
        if precision == "bf16" and not bf16:
            with pytest.raises(ValueError, match=f"{name} has no bf16"):
                finalize(config, 4, 1.0, 1)
        else:
            assert ds_config.precision_of(finalize(config, 4, 1.0, 1)) == precision
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not ds_config.has_bf16() and ds_config.default_precision() == "fp32"
    assert ds_config.precision_of(load_ds_config(None)) == "fp32"
    with pytest.raises(ValueError, match=r"fp16 needs a CUDA GPU .*configs/ds/zero2_fp32.json"):
        finalize(ds_config.make_ds_config(2, "fp16"), 4, 1.0, 1)
    assert ds_config.precision_of(finalize(ds_config.make_ds_config(2, "bf16"), 4, 1.0, 1)) == (
        "bf16")


def test_deepspeed_file_precision_and_stage_settings(tmp_path, monkeypatch):
    """train.precision (not auto) sets the file's precision; the stage comes from the file, or
    the stage argument."""
    import torch

    from siasam_fast import ds_config
    from siasam_fast.ds_config import FP16_DYNAMIC, config_file_name, precision_of

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config_file_name(2, "fp32") == "zero2_fp32.json"
    assert (ROOT / "configs" / "ds" / config_file_name(3, "bf16")).is_file()
    with pytest.raises(FileNotFoundError, match=r"'nope.json' does not exist"):
        load_ds_config("nope.json")
    sched = tmp_path / "sched.json"
    sched.write_text('{"scheduler": {"type": "WarmupLR"}}')
    with pytest.raises(ValueError, match=r"has an 'scheduler' block"):
        load_ds_config(str(sched))
    fp32 = str(ROOT / "configs" / "ds" / "zero3_fp32.json")
    assert load_ds_config(fp32)["fp16"] == {"enabled": False}
    as_fp16 = load_ds_config(fp32, "fp16")
    assert as_fp16["fp16"] == FP16_DYNAMIC and as_fp16["bf16"] == {"enabled": False}
    assert as_fp16["zero_optimization"]["stage"] == 3
    as_bf16 = load_ds_config(fp32, "bf16")
    assert as_bf16["bf16"] == {"enabled": True} and as_bf16["fp16"] == {"enabled": False}
    assert precision_of(load_ds_config(str(ROOT / "configs/ds/zero2_bf16.json"), "fp32")) == "fp32"
    # the stage and precision arguments without a file
    made = load_ds_config(None, "fp16", stage=3)
    assert made["zero_optimization"]["stage"] == 3 and made["fp16"] == FP16_DYNAMIC
    assert load_ds_config(None, "bf16", stage=0) == ds_config.make_ds_config(0, "bf16")


def test_bf16_spellings_and_precision_of():
    from siasam_fast.ds_config import _bf16_key, precision_of

    raw = {"bfloat16": {"enabled": True}}
    assert precision_of(raw) == "bf16" and raw == {"bfloat16": {"enabled": True}}  # not changed
    assert _bf16_key({"bf16": {"enabled": True}, "bfloat16": {"enabled": True}}, "x.json") == {
        "bf16": {"enabled": True}}
    with pytest.raises(ValueError, match=r"'x.json' has both 'bf16' and 'bfloat16', which "
                                         r"disagree: keep 'bf16'"):
        _bf16_key({"bf16": {"enabled": False}, "bfloat16": {"enabled": True}}, "x.json")
    assert precision_of({}) == "fp32" and precision_of({"fp16": {"enabled": False}}) == "fp32"
    assert precision_of({"fp16": {"enabled": True}}) == "fp16"


def test_finalize_writes_the_run_settings_and_refuses_what_deepspeed_would_misread(monkeypatch):
    import torch

    from siasam_fast.ds_config import make_ds_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = make_ds_config(2, "fp32", micro_batch=8, grad_clip=1.0)
    before = repr(base)
    final = finalize(base, 3, 0.25, 4, grad_accum=2)
    assert repr(base) == before  # the caller's dict is not changed
    assert (final["train_micro_batch_size_per_gpu"], final["gradient_accumulation_steps"],
            final["train_batch_size"], final["gradient_clipping"]) == (3, 2, 24, 0.25)
    assert final["timers"] == {"throughput": {"enabled": False}}
    own = {"throughput": {"enabled": True, "synchronized": False}}
    assert finalize({"timers": own}, 4, 1.0, 1)["timers"] == own
    assert finalize({"bfloat16": {"enabled": True}}, 4, 1.0, 1)["bf16"] == {"enabled": True}
    for config, key in (({"train_batch_size": "auto"}, "train_batch_size"),
                        ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}},
                         "zero_optimization")):
        with pytest.raises(ValueError, match=rf"key '{key}' uses 'auto', which plain DeepSpeed "
                                             r"ignores: write a real value"):
            finalize(config, 4, 1.0, 1)
    for accum in (True, 0, -1, 1.5):
        with pytest.raises(ValueError, match=rf"gradient_accumulation_steps={accum!r}: must be a "
                                             r"whole number >= 1"):
            finalize({"gradient_accumulation_steps": accum}, 4, 1.0, 1)
    for stage in (0, 1, 2, 3):
        assert finalize({"zero_optimization": {"stage": stage}}, 4, 1.0, 1)[
            "zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("override", [
    "model.dropout=0", "siamese.omega=0", "siamese.omega=1", "siamese.tau=1e-6",
    "siamese.alpha=0", "siamese.alpha_warmup=1", "train.warmup_ratio=0", "train.warmup_ratio=1",
    "train.grad_clip=0", "train.lr=0", "train.adam_beta1=0", "train.adam_eps=1e-12",
    "data.num_workers=0", "data.image_size=8", "data.max_question_len=3",
    "train.keep_checkpoints=1", "eval.num_clips=1", "train.save_every=0", "train.max_steps=0"])
def test_the_ends_of_each_valid_range_are_accepted(override):
    key, value = override.split("=")
    section, name = key.split(".")
    assert float(getattr(getattr(load_config(BASE, [override]), section), name)) == float(value)


@pytest.mark.parametrize("override, message", [
    ("model.dropout=1", "model.dropout=1.0: must lie in [0, 1)"),
    ("siamese.omega=1.5", "siamese.omega=1.5: must lie in [0, 1]"),
    ("siamese.omega=-0.1", "siamese.omega=-0.1: must lie in [0, 1]"),
    ("siamese.tau=0", "siamese.tau=0.0: must be > 0"),
    ("siamese.alpha_warmup=1.5", "siamese.alpha_warmup=1.5: must lie in [0, 1]"),
    ("train.adam_beta1=1", "train.adam_beta1=1.0: must lie in [0, 1)"),
    ("data.image_size=7", "data.image_size=7: must be >= 8 (pixels)"),
    ("data.max_question_len=2", "data.max_question_len=2: must be >= 3"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("data.decode_group=0", "data.decode_group=0: must be >= 1"),
    ("data.min_answer_count=0", "data.min_answer_count=0: must be >= 1"),
    ("model.max_grid=0", "model.max_grid=0: must be >= 1"),
    ("siamese.alpha=true", "siamese.alpha=True: expected a finite number"),
    ("train.batch_size=1e-3", "train.batch_size='1e-3': expected a whole number"),
])
def test_values_just_outside_a_range_name_the_key(override, message):
    with pytest.raises(ValueError) as err:
        load_config(BASE, [override])
    assert message in str(err.value)


CHOICES = [("data.backend", "auto, pyav, dali"), ("data.frame_fit", "crop, pad"),
           ("data.mc_text", "pair, joined"), ("model.qa_head", "auto, siasam, clipbert"),
           ("model.visual_head", "auto, proj, clipbert"),
           ("model.cnn_freeze", "auto, none, batchnorm, detectron2"),
           ("model.memory_format", "auto, channels_last, contiguous"),
           ("model.layer_norm", "auto, torch, apex"),
           ("model.activation_checkpointing", "none, cnn, all"),
           ("siamese.gt_clips", "anchor, all, pooled"),
           ("siamese.gt_pool", "mean, max, logsumexp"), ("siamese.mc_loss", "hinge, ce"),
           ("siamese.impl", "auto, triton, reference"),
           ("train.optimizer", "auto, torch, deepspeed, apex"),
           ("train.precision", "auto, fp32, fp16, bf16"),
           ("eval.aggregation", "mean, max, logsumexp"), ("eval.count_metric", "tgif, raw"),
           ("eval.split", "val, test, none"), ("task", "open, mc, count, multi")]


@pytest.mark.parametrize("key, valid", CHOICES)
def test_every_choice_key_names_its_valid_values(key, valid):
    with pytest.raises(ValueError) as err:
        load_config(BASE, [f"{key}=bogus"])
    assert f"{key}='bogus': valid values are {valid}" in str(err.value)
    for value in valid.split(", "):
        if value != "multi":  # (needs data.tasks)
            load_config(BASE, [f"{key}={value}"])


def test_booleans_numbers_and_strings_from_overrides_and_files(tmp_path):
    """Quoted YAML strings are booleans too (true / yes / on / 1, any case and spacing)."""
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text("data:\n  dedup: 'no'\nsiamese:\n  skg: ' Yes'\n  learn_w1: 'OFF'\n"
                      "train:\n  keep_best: '0'\n  overwrite: '1'\n")
    cfg = load_config(quoted)
    assert (cfg.data.dedup, cfg.siamese.skg, cfg.siamese.learn_w1, cfg.train.keep_best,
            cfg.train.overwrite) == (False, True, False, False, True)
    with pytest.raises(ValueError, match=r"train.out_dir=True: expected a string"):
        Config.from_dict({"train": {"out_dir": True}})  # a YAML file's unquoted true
    with pytest.raises(ValueError, match=r"train.out_dir is empty"):
        Config.from_dict({"train": {"out_dir": "  "}})
    assert load_config(BASE, ["data.video_dir=[a"]).data.video_dir == "[a"  # not YAML: as given
    assert load_config(BASE, [" train.lr = 2e-4"]).train.lr == 2e-4


def test_overrides_and_files_edge_cases(tmp_path):
    import json

    from siasam_fast.config import apply_overrides, config_from_json

    values = {"train": {"lr": 0.1}}
    assert apply_overrides(values, ["train.lr=0.2", "eval.batch_size=4"]) == {
        "train": {"lr": 0.2}, "eval": {"batch_size": 4}}
    assert values == {"train": {"lr": 0.1}}  # the caller's dict is not changed
    with pytest.raises(ValueError, match=r"override 'train.lr.x=1': 'lr' is not a section"):
        apply_overrides(values, ["train.lr.x=1"])
    with pytest.raises(ValueError, match=r"override 'train.lr': expected section.key=value"):
        apply_overrides(values, ["train.lr"])
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set: every default\n")
    assert load_config(empty) == Config()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lrr'\] in train; did you mean "
                                         r"'lr'\? valid: "):
        load_config(BASE, ["train.lrr=1"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['trian'\] in config; did you "
                                         r"mean 'train'\? valid: "):
        load_config(BASE, ["trian.lr=1"])
    with pytest.raises(ValueError, match=r"sampling.stride=0"):
        load_config(BASE, ["sampling.stride=0"])
    with pytest.raises(ValueError, match=r"siamese.gt_pool=logsumexp: task=count predicts a "
                                         r"number per clip, .* valid for count: mean, max"):
        load_config(BASE, ["task=count", "siamese.gt_clips=pooled"])
    assert load_config(BASE, ["task=count", "siamese.gt_clips=pooled",
                              "siamese.gt_pool=max"]).siamese.gt_pool == "max"
    assert load_config(BASE, ["task=count"]).siamese.gt_pool == "logsumexp"  # unused: anchor
    cfg = load_config(BASE, ["sampling.frames_per_clip=[5, 16]"])
    assert config_from_json(json.dumps(cfg.to_dict())) == cfg


def test_train_precision_keeps_the_files_own_block_of_that_precision(tmp_path):
    """--set train.precision=fp16 with an fp16 DeepSpeed file replaced the file's loss scaling
    (initial_scale_power, loss_scale_window, hysteresis, min_loss_scale) with the defaults,
    silently; it is kept now, and replaced only where the precision changes."""
    import json

    own = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 200,
           "hysteresis": 4, "min_loss_scale": 0.5}
    custom = tmp_path / "custom_fp16.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": own}))
    assert load_ds_config(str(custom))["fp16"] == own
    assert load_ds_config(str(custom), "fp16")["fp16"] == own
    assert load_ds_config(str(custom), "bf16")["fp16"] == {"enabled": False}
    bf16 = tmp_path / "custom_bf16.json"
    bf16.write_text(json.dumps({"bf16": {"enabled": True, "immediate_grad_update": True}}))
    assert load_ds_config(str(bf16), "bf16")["bf16"] == {"enabled": True,
                                                         "immediate_grad_update": True}
    assert load_ds_config(str(bf16), "fp32")["bf16"] == {"enabled": False}



def test_a_zero_optimization_that_is_not_a_mapping_is_refused():
    """DeepSpeed's older "zero_optimization": true passed finalize (True counts as stage 1), and
    the trainer then stopped with AttributeError: 'bool' object has no attribute 'get'."""
    for zero in (True, False, 2):  # DeepSpeed's older true / false spelling, or a bare stage
        with pytest.raises(ValueError, match=rf"zero_optimization={zero!r}: must be a mapping "
                                             r"such as \{\"stage\": 2\}"):
            finalize({"zero_optimization": zero}, 4, 1.0, 1)



def test_set_takes_1_and_0_for_a_boolean():
    """_TRUE / _FALSE list "1" and "0", but --set data.dedup=1 reaches the config as the number 1
    (YAML) and was refused."""
    cfg = load_config(BASE, ["data.dedup=0", "train.overwrite=1"])
    assert cfg.data.dedup is False and cfg.train.overwrite is True
    with pytest.raises(ValueError, match=r"data.dedup=2: expected true or false"):
        load_config(BASE, ["data.dedup=2"])
    with pytest.raises(ValueError, match=r"data.dedup=1.0: expected true or false"):
        load_config(BASE, ["data.dedup=1.0"])



def test_set_gives_a_string_key_the_text_as_written():
    """--set train.out_dir=010 ran in folder 8 (YAML 1.1 reads 010 as octal), 1.10 in 1.1;
    a date and a path with ': ' (parse_override's own example) were refused as not a string."""
    for text in ("010", "1.10", "2024-01-05", "/data/videos: old", "0x1F", "1_000", "true"):
        cfg = load_config(BASE, [f"train.out_dir={text}", f"data.video_dir={text}",
                                 f"model.tokenizer= {text}"])
        assert cfg.train.out_dir == cfg.data.video_dir == cfg.model.tokenizer == text
    assert load_config(BASE, ["train.out_dir='my run'"]).train.out_dir == "my run"  # YAML quotes
    assert load_config(BASE, ["train.epochs=3"]).train.epochs == 3  # numbers stay numbers
    cfg = load_config(None, ["task=multi", "data.tasks.qa.task=open", "data.tasks.qa.train=010",
                             "data.tasks.qa.dataset=msrvtt_qa"])
    assert cfg.stream("qa").data.train == "010"

