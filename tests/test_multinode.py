"""What a training on several nodes meets that one machine never shows, with stand-ins for the
other nodes (their processes' views gathered by a monkeypatched ``dist.all_gather_object``): the
processes must agree on the checkpoint they resume and on the optimizer they step with."""

import pytest
import torch

from siasam_fast import training
from siasam_fast.config import Config


def _gathered(monkeypatch, others):
    """dist as initialized; all_gather_object fills process 0's view, then ``others``' (each a
    function of process 0's view, as the other processes would send)."""
    monkeypatch.setattr(training.dist, "is_initialized", lambda: True)

    def gather(out, obj):
        out[0] = obj
        for i, other in enumerate(others, 1):
            out[i] = other(obj)

    monkeypatch.setattr(training.dist, "all_gather_object", gather)


def _run_with_checkpoint(folder):
    ckpt = folder / "checkpoints"
    (ckpt / "step4").mkdir(parents=True)
    (ckpt / "step4" / "run_state.json").write_text('{"step": 4}')
    (ckpt / "latest").write_text("step4")


def test_a_node_that_sees_another_run_folder_stops_every_process(tmp_path, monkeypatch):
    # Two "nodes": train.out_dir on a local disk of each (not shared): node A holds the run's
    # checkpoint, node B only its processes' own files (no 'latest', no run_state.json).
    node_a, node_b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    _run_with_checkpoint(node_a)
    (node_b / "checkpoints" / "step4").mkdir(parents=True)
    (node_b / "checkpoints" / "step4" / "rng_rank1.json").write_text("{}")
    view_b = training.start_view("if-any", node_b)
    assert training.start_view("if-any", node_a)["resume"].endswith("step4")
    assert view_b["resume"] is None
    _gathered(monkeypatch, [lambda mine: {**mine}, lambda mine: view_b])
    with pytest.raises(ValueError) as err:
        training.check_same_start(training.start_view("if-any", node_a), 3)
    message = str(err.value)
    assert "process 2" in message and "process 0" in message and "step4" in message
    assert "file system every node" in message


def test_processes_that_agree_go_on_and_share_an_error(tmp_path, monkeypatch):
    _run_with_checkpoint(tmp_path / "run")
    view = training.start_view("auto", tmp_path / "run")
    _gathered(monkeypatch, [lambda mine: {**mine, "host": "node2"}])
    training.check_same_start(view, 2)  # the same checkpoint on both nodes: no error
    missing = training.start_view("auto", tmp_path / "new")
    assert missing["error"] and missing["resume"] is None
    _gathered(monkeypatch, [lambda mine: {**mine, "host": "node2"}])
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):  # as on one process
        training.check_same_start(missing, 2)


def test_one_process_checks_nothing_with_others(tmp_path, monkeypatch):
    monkeypatch.setattr(training.dist, "all_gather_object", None)  # not called
    training.check_same_start(training.start_view(None, tmp_path / "run"), 1)


def test_a_node_that_could_not_build_fused_adam_makes_every_process_use_torch_adamw(
        monkeypatch, capsys):
    # node B has no cached FusedAdam build and no nvcc: it fell back (train.optimizer=auto)
    model = torch.nn.Linear(2, 2)
    cfg = Config()
    fused = object()  # stands in for DeepSpeed's FusedAdam
    _gathered(monkeypatch, [lambda mine: {**mine, "host": "node2", "name": "torch AdamW"}])
    optimizer, name = training.same_optimizer_everywhere(
        fused, "DeepSpeed FusedAdam", model, cfg, torch.device("cpu"), rank=0, world=2)
    assert name == "torch AdamW" and isinstance(optimizer, torch.optim.AdamW)
    assert "node2" in capsys.readouterr().out
    # every process has the same: nothing changes
    _gathered(monkeypatch, [lambda mine: {**mine, "host": "node2"}])
    assert training.same_optimizer_everywhere(
        fused, "DeepSpeed FusedAdam", model, cfg, torch.device("cpu"), rank=0,
        world=2) == (fused, "DeepSpeed FusedAdam")


def test_resume_auto_without_a_checkpoint_names_a_run_set_aside_by_overwrite(tmp_path):
    """train.overwrite moved the old run to replaced-<time>/, and the replacing run died before
    its first checkpoint: --resume auto said only "no checkpoint", not where the run was."""
    run = tmp_path / "run"
    _run_with_checkpoint(run / "replaced-20261128-190502")
    view = training.start_view("auto", run)
    assert view["error"].endswith(
        f"; the run that train.overwrite set aside is in {run / 'replaced-20261128-190502'}: "
        f"--resume {run / 'replaced-20261128-190502'} continues it (with --set "
        "train.overwrite=true while train.out_dir holds the failed run's files)")
    assert training.start_view("auto", tmp_path / "new")["error"].startswith("no checkpoint at")
