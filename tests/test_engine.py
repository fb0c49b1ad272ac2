import json

import pytest
import torch
from torch import nn

from selftrain.checkpoint import CheckpointDir
from selftrain.config import EngineConfig, OptimConfig
from selftrain.engine import BatchIndices, TrainingDiverged, build_runtime, fit
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


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    model, norm, step_fn = _problem()
    fit(model, step_fn, steps=30, optim=OPTIM, engine=ENGINE, out_dir=tmp_path / "a", seed=1, desc="a", stateful={"n": norm})

    model2, norm2, step_fn2 = _problem()

    def dies_at_17(step):
        if step == 17:
            raise Killed
        return step_fn2(step)

    with pytest.raises(Killed):
        fit(model2, dies_at_17, steps=30, optim=OPTIM, engine=ENGINE, out_dir=tmp_path / "b", seed=1, desc="b", stateful={"n": norm2})
    model3, norm3, step_fn3 = _problem(seed=99)  # fresh process state: different init, reloaded from step 14
    result = fit(model3, step_fn3, steps=30, optim=OPTIM, engine=ENGINE, out_dir=tmp_path / "b", seed=1, desc="b", stateful={"n": norm3})
    assert result.resumed_from == 14
    for (k, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), k
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
