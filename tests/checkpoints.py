"""A checkpoint folder as a training run saves it (model weights, run state, the run's answer
vocabulary), without training: for tests of ``init_model_from`` and ``answer_question``."""

import json
from pathlib import Path


def write_checkpoint(model, cfg, ans2label: dict, tag_dir: Path) -> Path:
    import torch

    from siasam_fast.data.vocab import save_ans2label
    from siasam_fast.training import _vocab_hash

    tag_dir.mkdir(parents=True)
    torch.save(model.state_dict(), tag_dir / "model_weights.pt")
    (tag_dir / "run_state.json").write_text(json.dumps(
        {"step": 1, "epoch": 0, "sampler": {}, "config": cfg.to_dict(),
         "vocab": _vocab_hash(ans2label)}))
    save_ans2label(ans2label, tag_dir.parent.parent / "ans2label.json")
    return tag_dir
