import json

import pytest
import torch
from torch import nn

from selftrain.checkpoint import CheckpointDir
from selftrain.config import EngineConfig, OptimConfig
from selftrain.engine import FAULT_NAN_ENV, BatchIndices, TrainingDiverged, build_runtime, fault_nan_steps, fit
from selftrain.losses import LossNormalization


def test_batch_indices_cover_each_epoch_once_and_are_pure():
    b = BatchIndices(10, 4, seed=3)
    first_epoch = torch.cat([b(0), b(1), b(2)[:2]])
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert torch.equal(BatchIndices(10, 4, seed=3)(7), b(7))  # no hidden state
    assert not torch.equal(BatchIndices(10, 4, seed=4)(0), b(0))


def test_runtime_is_fp32_on_cpus_without_native_bf16():
    rt = build_runtime(EngineConfig(device="cpu"))
    assert rt.device.type == "cpu" and rt.precision in ("32-true", "bf16-mixed")
    assert build_runtime(EngineConfig(device="cpu", precision="32-true")).precision == "32-true"


def _problem(seed=0):
    g = torch.Generator().manual_seed(0)  # the data is the same for every run
    x, w = torch.randn(64, 5, generator=g), torch.randn(5, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(64, 1, generator=g)
    torch.manual_seed(seed)  # the initial weights are not
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    norm = LossNormalization(alpha=1.0)
    batches = BatchIndices(64, 8, seed=0)

    def step_fn(step):
        i = batches(step)
        err = (model(x[i]) - y[i]).pow(2)
        return {"loss": norm(err[:4].mean(), err[4:].mean())}

    return model, norm, step_fn


ENGINE = EngineConfig(device="cpu", precision="32-true", checkpoint_every=7, progress=False)
OPTIM = OptimConfig(lr=0.05)


class Killed(Exception):
    pass


def _fit(out, step_fn, model, norm, steps=30, engine=ENGINE):
    return fit(model, step_fn, steps=steps, optim=OPTIM, engine=engine, out_dir=out, seed=1, desc="t", stateful={"n": norm})


def _killed_at_17(out):
    """A run into ``out`` that dies at step 17, after its checkpoints at steps 7 and 14."""
    model, norm, step_fn = _problem()

    def dies_at_17(step):
        if step == 17:
            raise Killed
        return step_fn(step)

    with pytest.raises(Killed):
        _fit(out, dies_at_17, model, norm)


def _resumed(out):
    """The run into ``out`` again, in fresh process state (other initial weights, reloaded from a checkpoint)."""
    model, norm, step_fn = _problem(seed=99)
    return _fit(out, step_fn, model, norm), model, norm


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    model, norm, step_fn = _problem()
    _fit(tmp_path / "a", step_fn, model, norm)
    _killed_at_17(tmp_path / "b")
    result, model3, norm3 = _resumed(tmp_path / "b")
    assert result.resumed_from == 14
    _assert_same_weights(model, model3)
    assert norm3.avg_human.item() == norm.avg_human.item()
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated metric lines after the resume


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path):
    model, _, step_fn = _problem()

    def sometimes_nan(step):
        out = step_fn(step)
        return {"loss": out["loss"] * float("nan")} if step in (3, 4) else out

    result = fit(model, sometimes_nan, steps=10, optim=OPTIM, engine=ENGINE, out_dir=tmp_path / "a", seed=0, desc="a")
    assert result.bad_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())

    def always_nan(step):
        return {"loss": step_fn(step)["loss"] * float("nan")} if step >= 8 else step_fn(step)

    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        fit(model, always_nan, steps=40, optim=OPTIM, engine=ENGINE, out_dir=tmp_path / "c", seed=0, desc="c")
    assert CheckpointDir(tmp_path / "c" / "checkpoints").steps() == [7]


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    ckpts = CheckpointDir(tmp_path, keep=3)
    for step in (5, 10):
        ckpts.save(step, {"w": torch.full((3,), float(step))}, {"step": step})
    newest = tmp_path / "step-0000010" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:20])
    step, weights, state = ckpts.load_latest()
    assert step == 5 and weights["w"][0].item() == 5.0 and state["step"] == 5
    assert "unreadable" in caplog.text


def test_checkpoint_state_with_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    ckpts = CheckpointDir(tmp_path)
    ckpts.save(1, {"w": torch.zeros(1)}, {"step": 1})
    torch.save({"evil": Payload()}, tmp_path / "step-0000001" / "state.pt")
    assert ckpts.load_latest() is None  # refused by weights_only=True, never executed



@pytest.mark.parametrize("damage", ["weights truncated", "state truncated", "state zero bytes"])
def test_fit_resumes_from_the_previous_checkpoint_when_the_newest_is_truncated(tmp_path, caplog, damage):
    model, norm, step_fn = _problem()
    _fit(tmp_path / "a", step_fn, model, norm)
    _killed_at_17(tmp_path / "b")
    newest = tmp_path / "b" / "checkpoints" / "step-0000014"
    target = newest / ("model.safetensors" if damage.startswith("weights") else "state.pt")
    target.write_bytes(b"" if "zero" in damage else target.read_bytes()[: target.stat().st_size // 2])
    result, model3, _ = _resumed(tmp_path / "b")
    assert result.resumed_from == 7  # the newest (14) is unreadable: the one before it
    assert f"checkpoint {newest} is unreadable" in caplog.text
    _assert_same_weights(model, model3)


def test_nan_steps_from_the_environment_are_skipped_counted_and_survive_a_resume(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(FAULT_NAN_ENV, "3,4,20")
    model, norm, step_fn = _problem()
    assert _fit(tmp_path / "a", step_fn, model, norm).bad_steps == 3
    assert "non-finite loss at step 20" in caplog.text
    _killed_at_17(tmp_path / "b")
    result, model3, _ = _resumed(tmp_path / "b")
    assert (result.resumed_from, result.bad_steps) == (14, 3)  # 3 and 4 from the checkpoint, 20 after it
    _assert_same_weights(model, model3)
    monkeypatch.delenv(FAULT_NAN_ENV)
    clean, norm4, step_fn4 = _problem()
    _fit(tmp_path / "c", step_fn4, clean, norm4)
    assert not all(torch.equal(x, y) for x, y in zip(clean.parameters(), model.parameters()))  # the steps were skipped


def test_fault_nan_steps_reads_lists_and_ranges(monkeypatch):
    monkeypatch.delenv(FAULT_NAN_ENV, raising=False)
    assert fault_nan_steps() == frozenset()
    monkeypatch.setenv(FAULT_NAN_ENV, "3,4, 10-12,")
    assert fault_nan_steps() == {3, 4, 10, 11, 12}
    for bad in ("x", "3-", "-2", "4-x", "5-3"):
        monkeypatch.setenv(FAULT_NAN_ENV, bad)
        with pytest.raises(ValueError, match=FAULT_NAN_ENV):
            fault_nan_steps()
