"""A converged lower layer takes no part in the backward pass: no gradient, no node in the graph."""

import pytest
import torch
from conftest import synthetic_batches, tiny_bert

from aroma_peft import AromaConfig, get_aroma_model

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def graph_nodes(loss: torch.Tensor) -> set:
    """Every autograd node reachable from ``loss`` (grad_fn.next_functions, recursively)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


def backward_with_converged(converged_layers: set[int]):
    """Drop the live component of every module of ``converged_layers``; one forward and backward.

    Returns the model, the nodes reachable from the loss, and per layer the grad_fn of every
    tensor its submodules output in the forward pass (None where no graph was recorded).
    """
    model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=TARGETS, modules_to_save=["classifier"]))
    layers = model.base_model.bert.encoder.layer
    for name, layer in model.aroma_layers.items():
        if int(name.split("encoder.layer.")[1].split(".")[0]) in converged_layers:
            layer.drop_live()
    produced = {i: [] for i in range(len(layers))}

    def record(i):
        def hook(_module, _args, out):
            for t in out if isinstance(out, tuple) else (out,):
                if torch.is_tensor(t):
                    produced[i].append(t.grad_fn)
        return hook

    handles = [m.register_forward_hook(record(i)) for i, layer in enumerate(layers) for m in layer.modules()]
    model.train()
    loss = model(**synthetic_batches(1)[0]).loss
    for h in handles:
        h.remove()
    nodes = graph_nodes(loss)
    loss.backward()
    return model, nodes, produced


def leaves(nodes: set) -> set[int]:
    """ids of the parameters the graph accumulates gradients into."""
    return {id(n.variable) for n in nodes if hasattr(n, "variable")}


def test_a_converged_lower_layer_gets_no_gradient_and_is_not_in_the_backward_graph():
    model, nodes, produced = backward_with_converged({0})
    layer0, layer1 = model.base_model.bert.encoder.layer
    assert produced[0] and all(fn is None for fn in produced[0])  # nothing of layer 0 was recorded
    for name, p in layer0.named_parameters():
        assert p.grad is None, name
        assert id(p) not in leaves(nodes), name
    assert layer1.attention.self.query.lora_B.grad is not None  # the layer above still trains
    assert any(fn in nodes for fn in produced[1])


def test_an_active_lower_layer_is_in_the_backward_graph():
    # The same checks would fail here: the test above can fail.
    model, nodes, produced = backward_with_converged(set())
    layer0 = model.base_model.bert.encoder.layer[0]
    assert any(fn is not None and fn in nodes for fn in produced[0])
    assert layer0.attention.self.query.lora_B.grad is not None
    assert id(layer0.attention.self.query.lora_B) in leaves(nodes)


@pytest.mark.parametrize("converged", [{1}, {0, 1}])
def test_converged_modules_never_get_a_gradient(converged):
    # A converged layer above an active one stays in the graph (the gradient must pass through
    # it to reach layer 0) but none of its own parameters receives a gradient.
    model, nodes, produced = backward_with_converged(converged)
    for i in converged:
        for name, p in model.base_model.bert.encoder.layer[i].named_parameters():
            assert p.grad is None, name
    assert (any(fn is not None for fn in produced[1])) == (0 not in converged)
    assert model.base_model.classifier.weight.grad is not None
