"""The graph-captured step's machinery on the CPU: its static batches, its warm-up undone, and
which step a config gets. The capture itself needs CUDA (tests/test_cuda.py)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from gvae.config import MODEL_NAMES, TrialConfig
from gvae.data import load_dataset
from gvae.errors import GvaeError
from gvae.graphs import GraphStep, Snapshot, training_step, unsupported, warm_up
from gvae.trainer import model_and_batches

STEPS = 6
CPU = torch.device("cpu")


def eager_after_warm_up(step, model, snapshot: Snapshot):
    """What capture_cuda_graph does but the capture: the warm-up, undone; then the plain step."""
    warm_up(step, model, snapshot)
    return step


def trained(model_name: str, packed: bool, graph: bool) -> tuple[list[dict], dict]:
    """Each step's losses and the final state of STEPS steps of a fresh model, eager or through
    GraphStep (over its static batches, after its warm-up)."""
    config = TrialConfig(model=model_name, batch_size=8, n_critic=2, device="cpu")
    configs = [dataclasses.replace(config, seed=seed) for seed in ((3, 4) if packed else (3,))]
    model, batches = model_and_batches(configs, packed, load_dataset("mnist5k"), CPU)
    step = GraphStep(model, batches, eager_after_warm_up).replay if graph else None
    losses = []
    for _ in range(STEPS):
        result = step() if step else model.train_step(batches)
        losses.append({name: value.clone() for name, value in result.items()})
    return losses, model.state_dict()


@pytest.mark.parametrize("packed", [False, True], ids=["lone", "pack"])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_a_graph_steps_machinery_leaves_every_number_of_the_eager_step(model_name, packed):
    eager_losses, eager_state = trained(model_name, packed, graph=False)
    graph_losses, graph_state = trained(model_name, packed, graph=True)
    for eager, graph in zip(eager_losses, graph_losses, strict=True):
        assert eager.keys() == graph.keys()
        for name in eager:
            assert torch.equal(eager[name], graph[name]), name
    for name, nets in eager_state["nets"].items():
        for key, value in nets.items():
            assert torch.equal(value, graph_state["nets"][name][key]), (name, key)
    for name, optimizer in eager_state["optimizers"].items():
        for index, state in optimizer["state"].items():
            graph = graph_state["optimizers"][name]["state"][index]
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(graph[key])), key


@pytest.mark.parametrize("model_name", ["wgan", "cvaegan"])  # RMSprop's state, and Adam's
def test_a_graph_step_over_a_resumed_model_leaves_its_loaded_state(model_name):
    config = TrialConfig(model=model_name, batch_size=8, n_critic=2, device="cpu")
    dataset = load_dataset("mnist5k")
    straight, batches = model_and_batches([config], False, dataset, CPU)
    for _ in range(3):
        straight.train_step(batches)
    saved = copy.deepcopy((straight.state_dict(), torch.get_rng_state(), batches.state()))
    expected = [straight.train_step(batches) for _ in range(3)]

    resumed, resumed_batches = model_and_batches([config], False, dataset, CPU)
    resumed.load_state_dict(saved[0])  # as the trainer resumes: before its step is made
    torch.set_rng_state(saved[1])
    resumed_batches.load_state(saved[2])
    step = GraphStep(resumed, resumed_batches, eager_after_warm_up).replay
    for want in expected:
        got = step()
        assert all(torch.equal(want[name], got[name]) for name in want)


def test_the_warm_up_is_undone_even_when_capture_fails():
    config = TrialConfig(model="wgan", batch_size=8, device="cpu")
    model, batches = model_and_batches([config], False, load_dataset("mnist5k"), CPU)
    before = {k: v.clone() for k, v in model.nets["critic"].state_dict().items()}
    generator = batches.generator.get_state()

    def failing_capture(step, model, snapshot):
        step()
        step()
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError):
        GraphStep(model, batches, failing_capture)
    after = model.nets["critic"].state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert not any(
        model.optimizers["critic"].state[p]["square_avg"].any() for p in model.critic.parameters()
    )
    assert torch.equal(batches.generator.get_state(), generator)  # no batch was drawn


def test_which_step_a_config_gets_on_the_cpu():
    config = TrialConfig(model="gan", batch_size=8)
    model, batches = model_and_batches([config], False, load_dataset("mnist5k"), CPU)
    lines: list[str] = []
    for mode in ("off", "auto"):  # auto on the CPU: eager, with nothing to say
        step = training_step(
            dataclasses.replace(config, graph=mode), model, batches, CPU, lines.append
        )
        assert set(step()) == {"d_loss", "g_loss"}
    assert lines == []
    with pytest.raises(GvaeError) as error:
        training_step(dataclasses.replace(config, graph="on"), model, batches, CPU, lines.append)
    assert str(error.value) == (
        "graph: on, but CUDA graphs need a CUDA device and this trial runs on cpu; "
        "set graph: auto (eager then) or off"
    )
    assert unsupported(torch.device("cuda"), object()) == (
        "the dataset is streamed from disk, decoded on the host at each step"
    )
    assert unsupported(torch.device("cuda"), batches) is None
