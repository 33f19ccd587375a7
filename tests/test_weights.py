"""siasam-fast weights, and a model started from local pretrained folders (offline: tiny random
models saved with save_pretrained stand in for the Hub's ResNet-50 and BERT-base)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from subprocess_env import cpu_env
from transformers import BertConfig, BertModel, ResNetConfig, ResNetModel

from siasam_fast.config import ModelConfig
from siasam_fast.model import TEXT_PRESETS, VISUAL_PRESETS, SiaSamReaModel, load_tokenizer
from siasam_fast.weights import config_lines, fetch_weights, folder_name, writable_out

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A 'pretrained' tiny ResNet and a tiny BERT with the shipped vocabulary, as
    save_pretrained folders (what the Hub's repositories hold)."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(11)
    visual = root / "tiny-resnet"
    ResNetModel(ResNetConfig(**VISUAL_PRESETS["tiny"])).save_pretrained(visual)
    tokenizer = load_tokenizer(ModelConfig())
    text = root / "tiny-bert"
    BertModel(BertConfig(vocab_size=len(tokenizer), **TEXT_PRESETS["tiny"])).save_pretrained(text)
    tokenizer.save_pretrained(text)
    return visual, text


def test_fetch_saves_folders_the_model_loads(sources, tmp_path):
    visual, text = sources
    lines = []
    folders = fetch_weights(tmp_path / "weights", visual=str(visual), text=str(text),
                            log=lines.append)
    assert folders == {"visual": tmp_path / "weights" / "tiny-resnet",
                       "text": tmp_path / "weights" / "tiny-bert"}
    assert {"tokenizer.json", "vocab.txt"} & {p.name for p in folders["text"].iterdir()}
    assert not list((tmp_path / "weights").glob(".*"))  # no partial folder left
    # A model built from them starts from exactly the saved weights, with their tokenizer.
    model = SiaSamReaModel(ModelConfig(visual=str(folders["visual"]), text=str(folders["text"])),
                           "open", num_answers=5, vocab_size=1, num_clips=3)
    saved_visual = ResNetModel.from_pretrained(visual).state_dict()
    for name, value in model.visual.trunk.state_dict().items():
        assert torch.equal(value, saved_visual[name]), name
    saved_text = BertModel.from_pretrained(text).state_dict()
    for name, value in model.text.state_dict().items():
        assert torch.equal(value, saved_text[name]), name
    tokens = load_tokenizer(ModelConfig(text=str(folders["text"]))).tokenize("what color is it")
    assert tokens == ["what", "color", "is", "it"]
    assert "model:\n  visual: " in config_lines(folders)
    # A second fetch keeps what is there.
    stamp = (folders["visual"] / "config.json").stat().st_mtime_ns
    lines.clear()
    fetch_weights(tmp_path / "weights", visual=str(visual), text=str(text), log=lines.append)
    assert sum("already there" in line for line in lines) == 2
    assert (folders["visual"] / "config.json").stat().st_mtime_ns == stamp


def test_folder_names():
    assert folder_name("microsoft/resnet-50") == "microsoft--resnet-50"
    assert folder_name("google-bert/bert-base-uncased") == "google-bert--bert-base-uncased"


def test_cli_fetches_and_reports_bad_sources(sources, tmp_path):
    visual, text = sources
    env = cpu_env(HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "siasam_fast.cli", "weights", str(tmp_path / "w")]
    proc = subprocess.run([*cmd, "--visual", str(visual), "--text", str(text)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"visual: {tmp_path / 'w' / 'tiny-resnet'}" in proc.stdout
    assert f"--set model.text={tmp_path / 'w' / 'tiny-bert'}" in proc.stdout
    # A BERT folder is not a ResNet: one line naming the option, status 2, nothing left behind.
    proc = subprocess.run([*cmd, "--visual", str(text), "--text", str(text), "--force"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"siasam-fast weights: error: --visual={str(text)!r}: not a ResNetModel checkpoint: "
            "its config is a 'bert' model, not 'resnet'") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "w").glob(".*"))
    # No network here (HF_HUB_OFFLINE): a Hub id fails the same way, with the way out.
    proc = subprocess.run([*cmd, "--visual", "microsoft/resnet-50", "--text", str(text)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--visual='microsoft/resnet-50': transformers could not load it" in proc.stderr
    assert "copy the output folder over" in proc.stderr


def test_training_and_evaluation_start_from_the_fetched_folders(sources, tmp_path):
    """train.py with model.visual / model.text at fetched folders (their tokenizer too), then
    siasam-fast eval of the checkpoint, offline."""
    from siasam_fast.data.synthetic import generate
    from siasam_fast.pipeline.manifest import build_manifest

    visual, text = sources
    folders = fetch_weights(tmp_path / "weights", visual=str(visual), text=str(text),
                            log=lambda line: None)
    data = tmp_path / "synth"
    generate(data, num_videos=8, seed=5, size=64, workers=1, progress=False)
    build_manifest(data / "videos", data / "manifest.jsonl", workers=1, progress=False)
    out = tmp_path / "run"
    sets = {"data.train": data / "annotations" / "train_qa.json",
            "data.val": data / "annotations" / "val_qa.json", "data.test": "",
            "data.manifest": data / "manifest.jsonl", "data.num_workers": 0,
            "train.batch_size": 4, "train.max_steps": 2, "train.out_dir": out,
            "sampling.num_clips": 3, "sampling.frames_per_clip": 2,
            "model.visual": folders["visual"], "model.text": folders["text"]}
    args = ["--config", str(ROOT / "configs" / "synthetic.yaml")]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    env = cpu_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "done: 2 steps" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "siasam_fast.cli", "eval", "--checkpoint",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout


def test_fetch_refuses_two_sources_saved_under_one_name(sources, tmp_path):
    """--visual a/model --text b/model: the text fetch replaced the ResNet folder (exit 0, both
    config lines naming the BERT)."""
    visual, text = sources
    import shutil
    shutil.copytree(visual, tmp_path / "a" / "model")
    shutil.copytree(text, tmp_path / "b" / "model")
    with pytest.raises(ValueError, match="would both be saved as"):
        fetch_weights(tmp_path / "w", visual=str(tmp_path / "a" / "model"),
                      text=str(tmp_path / "b" / "model"), log=lambda line: None)


def test_fetch_refuses_a_text_folder_without_tokenizer(sources, tmp_path):
    """transformers 5 builds an empty tokenizer there: every word became [UNK], silently."""
    import shutil
    visual, text = sources
    bare = tmp_path / "bare-bert"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(text / name, bare / name)
    with pytest.raises(ValueError, match="no tokenizer vocabulary"):
        fetch_weights(tmp_path / "w", visual=str(visual), text=str(bare), log=lambda line: None)
    assert not (tmp_path / "w" / "bare-bert").exists()


def test_printed_folders_are_absolute(sources, tmp_path, monkeypatch):
    visual, text = sources
    monkeypatch.chdir(tmp_path)
    folders = fetch_weights("w", visual=str(visual), text=str(text), log=lambda line: None)
    assert folders["visual"] == tmp_path / "w" / "tiny-resnet"
    assert f"model.text={tmp_path / 'w' / 'tiny-bert'}" in config_lines(folders)


def test_head_checkpoints_load(tmp_path):
    """What the Hub holds: microsoft/resnet-50 is a ResNetForImageClassification,
    bert-base-uncased a BertForMaskedLM (masked-LM folders have no pooler)."""
    from transformers import BertForMaskedLM, BertForPreTraining, ResNetForImageClassification

    from siasam_fast.model import build_text, build_visual

    tokenizer = load_tokenizer(ModelConfig())
    ResNetForImageClassification(ResNetConfig(num_labels=7, **VISUAL_PRESETS["tiny"])
                                 ).save_pretrained(tmp_path / "cls")
    assert isinstance(build_visual(str(tmp_path / "cls")), ResNetModel)
    for cls in (BertForPreTraining, BertForMaskedLM):
        folder = tmp_path / cls.__name__
        cls(BertConfig(vocab_size=len(tokenizer), **TEXT_PRESETS["tiny"])).save_pretrained(folder)
        assert isinstance(build_text(str(folder), len(tokenizer), 0.1), BertModel)


def test_fetch_clears_leftovers_and_fetches_again_what_does_not_load(sources, tmp_path):
    """A .NAME.partial folder left by a killed fetch (SIGKILL: no cleanup ran) does not block the
    next; a folder in place that does not load (an empty ResNet folder, a BERT folder with its
    tokenizer but not its weights) is fetched again; with force, one that loads too."""
    from siasam_fast.model import build_text, build_visual

    visual, text = sources
    out = tmp_path / "w"
    (out / ".tiny-resnet.partial").mkdir(parents=True)
    (out / ".tiny-resnet.partial" / "config.json").write_text("{")
    (out / "tiny-resnet").mkdir()
    shutil.copytree(text, out / "tiny-bert")
    (out / "tiny-bert" / "model.safetensors").unlink()
    lines = []
    folders = fetch_weights(out, visual=str(visual), text=str(text), log=lines.append)
    assert not any("already there" in line for line in lines), lines
    assert not list(out.glob(".*"))
    build_visual(str(folders["visual"]))
    build_text(str(folders["text"]), 1, 0.1)
    lines.clear()
    fetch_weights(out, visual=str(visual), text=str(text), force=True, log=lines.append)
    assert sum("fetching" in line for line in lines) == 2, lines


def test_a_failed_save_leaves_no_partial_folder(sources, tmp_path, monkeypatch):
    from transformers import BertTokenizerFast

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    visual, text = sources
    monkeypatch.setattr(BertTokenizerFast, "save_pretrained", full)
    with pytest.raises(OSError, match="No space left"):
        fetch_weights(tmp_path / "w", visual=str(visual), text=str(text), log=lambda line: None)
    assert not list((tmp_path / "w").glob(".*"))
    assert not (tmp_path / "w" / "tiny-bert").exists()


def test_an_out_that_is_a_file_or_not_writable_is_named(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        writable_out(file)
    if Path("/proc/self").is_dir():  # a folder nobody can write in, root included
        with pytest.raises(ValueError, match="'/proc': cannot write there"):
            writable_out("/proc")


def test_a_folder_without_batchnorm_counters_loads_and_one_without_a_weight_does_not(tmp_path):
    """Converted ResNets may leave num_batches_tracked out (not weights); a missing weight
    would start random and is refused."""
    from safetensors.torch import load_file, save_file

    from siasam_fast.model import build_visual

    folder = tmp_path / "r"
    ResNetModel(ResNetConfig(**VISUAL_PRESETS["tiny"])).save_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    assert len(kept) < len(weights)
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = build_visual(str(folder))
    for k, v in kept.items():
        assert torch.equal(model.state_dict()[k], v), k
    gone = "encoder.stages.0.layers.0.layer.0.convolution.weight"
    save_file({k: v for k, v in kept.items() if k != gone}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"not a ResNetModel checkpoint: 1 of its weights are "
                                         f"missing \\(e.g. {gone}\\)"):
        build_visual(str(folder))


def test_a_weight_of_another_shape_is_named(sources, tmp_path):
    """transformers' refusal ("... thus raising an error. For details look at the above
    report!") came without its report, which the loader silences: no weight was named."""
    from safetensors.torch import load_file, save_file

    text = tmp_path / "bert"
    shutil.copytree(sources[1], text)
    weights = load_file(str(text / "model.safetensors"))
    bad = "encoder.layer.0.output.dense.bias"
    weights[bad] = torch.zeros(7)
    save_file(weights, str(text / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"--text='{text}': not a BertModel checkpoint: 1 of its "
                                         rf"weights have another shape \(e.g. {bad}: \(7,\) there, "
                                         r"\(\d+,\) in its config\)"):
        fetch_weights(tmp_path / "out", visual=str(sources[0]), text=str(text), log=lambda *_: 0)
