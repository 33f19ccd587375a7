"""``siasam-fast weights``: the pretrained CNN and BERT a real run starts from, fetched once.

The model presets (``model.visual: resnet50``, ``model.text: bert-base``) are randomly
initialised, which suits benchmarks and the synthetic set; the paper fine-tunes ClipBERT, whose
trunk starts from an ImageNet ResNet-50 and whose text side from BERT-base (uncased). This command
downloads those two from the Hugging Face Hub with transformers (or copies any local
``save_pretrained`` folders), saves each as a local folder that ``model.visual`` / ``model.text``
read offline (the tokenizer goes beside BERT, where ``model.text`` finds it), checks that the
package loads them, and prints the config lines that use them.

Each folder is written under a hidden name and renamed into place once complete, so an
interrupted fetch leaves nothing that looks finished; a folder already in place that loads is
kept as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# ClipBERT's starting points as the Hub names them (transformers' ResNetModel and BertModel).
VISUAL = "microsoft/resnet-50"
TEXT = "google-bert/bert-base-uncased"


def folder_name(source: str) -> str:
    """The local folder name for a Hub id or a local folder: ``microsoft/resnet-50`` ->
    ``microsoft--resnet-50`` (as the Hub's cache names repositories), a folder -> its name."""
    path = Path(source)
    if path.is_dir():
        return path.resolve().name
    return source.strip("/").replace("/", "--")


def _load(cls, source: str, what: str):
    """``cls.from_pretrained(source)`` from the Hub or a folder, checked as the model's own
    loaders check it; a refusal names the option and the way out."""
    from siasam_fast.model import from_pretrained_checked

    return from_pretrained_checked(
        cls, what, source, local_only=False,
        hint=(". Give a Hub id or a local save_pretrained folder; on a machine without internet, "
              "run this command where there is internet and copy the output folder over"))


def _save(out: Path, name: str, write) -> Path:
    """Run ``write(folder)`` into ``out/.name.partial`` and rename it to ``out/name``."""
    target = out / name
    partial = out / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        write(partial)
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _loads(kind: str, folder: Path) -> bool:
    """Whether the package's own loader takes ``folder`` (``kind``: visual or text)."""
    from siasam_fast.config import ModelConfig
    from siasam_fast.model import build_text, build_visual, load_tokenizer

    try:
        if kind == "visual":
            build_visual(str(folder))
        else:
            tokenizer = load_tokenizer(ModelConfig(text=str(folder)))
            build_text(str(folder), len(tokenizer), 0.1)
    except (ValueError, OSError):
        return False
    return True


def writable_out(out: str | Path) -> Path:
    """``out`` made absolute (the printed config lines work from any working directory), created,
    and checked writable before anything is downloaded or converted."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {str(out)!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ValueError(f"OUT {str(out)!r}: cannot write there ({err.strerror})") from None
    return out


def fetch_weights(out: str | Path, visual: str = VISUAL, text: str = TEXT, force: bool = False,
                  log=print) -> dict[str, Path]:
    """Fetch ``visual`` (a ResNet) and ``text`` (a BERT and its tokenizer) into folders of
    ``out``; returns ``{"visual": folder, "text": folder}``. A folder already there that the
    package loads is kept unless ``force``."""
    from transformers import BertModel, BertTokenizerFast, ResNetModel

    out = writable_out(out)
    names = {"visual": folder_name(visual), "text": folder_name(text)}
    if names["visual"] == names["text"] and visual != text:  # text would replace the ResNet
        raise ValueError(f"--visual {visual!r} and --text {text!r} would both be saved as "
                         f"{str(out / names['visual'])!r}; copy one to a folder of another name")
    folders = {}
    for kind, source in (("visual", visual), ("text", text)):
        target = out / names[kind]
        if not force and target.is_dir() and _loads(kind, target):
            log(f"{kind}: {target} is already there (it loads); kept")
            folders[kind] = target
            continue
        log(f"{kind}: fetching {source} ...")
        if kind == "visual":
            model = _load(ResNetModel, source, "--visual")
            folders[kind] = _save(out, target.name, model.save_pretrained)
        else:
            model = _load(BertModel, source, "--text")
            tokenizer = _load(BertTokenizerFast, source, "--text")

            def write(folder: Path, model=model, tokenizer=tokenizer) -> None:
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)

            folders[kind] = _save(out, target.name, write)
        if not _loads(kind, folders[kind]):
            raise ValueError(f"--{kind} {source!r}: saved to {folders[kind]}, but the package "
                             "cannot load it back (see model.py: build_visual / build_text)")
        log(f"{kind}: {folders[kind]}")
    return folders


def config_lines(folders: dict[str, Path]) -> str:
    """The config that uses ``folders`` (YAML and the equivalent --set options)."""
    v, t = folders["visual"], folders["text"]
    return (f"model:\n  visual: {v}\n  text: {t}        # its tokenizer is read from there too\n"
            f"(or: --set model.visual={v} --set model.text={t})")
