"""The recurrent LMs' core: the hand-written LSTM cell against torch's, shapes, parameter counts,
state carrying, generation and bad input."""

import pytest
import torch

from modules.rnn.model import CharRNN, CharRNNConfig, HandLSTM, LSTMCell


def test_hand_lstm_cell_matches_torch_to_1e6():
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(5, 7).double()
    mine = LSTMCell(5, 7).double()
    mine.load_state_dict(ref.state_dict())  # same names and layout (gates i, f, g, o)
    x, h, c = torch.randn(3, 5).double(), torch.randn(3, 7).double(), torch.randn(3, 7).double()
    x.requires_grad_()
    h1, c1 = mine(x, (h, c))
    h2, c2 = ref(x, (h, c))
    torch.testing.assert_close(h1, h2, atol=1e-6, rtol=0)
    torch.testing.assert_close(c1, c2, atol=1e-6, rtol=0)
    g1 = torch.autograd.grad((h1 * c1).sum(), x)[0]
    g2 = torch.autograd.grad((h2 * c2).sum(), x)[0]
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)


def test_hand_lstm_stack_matches_nn_lstm_over_a_sequence():
    torch.manual_seed(1)
    ref = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True)
    mine = HandLSTM(4, 6, 2)
    for i, cell in enumerate(mine.cells):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).data.copy_(getattr(ref, f"{name}_l{i}"))
    x = torch.randn(3, 9, 4)
    state = (torch.randn(2, 3, 6), torch.randn(2, 3, 6))
    out1, (h1, c1) = mine(x, state)
    out2, (h2, c2) = ref(x, state)
    for a, b in ((out1, out2), (h1, h2), (c1, c2)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell, per_layer", [
    ("lstm", lambda i, h: 4 * (i * h + h * h + 2 * h)),
    ("hand-lstm", lambda i, h: 4 * (i * h + h * h + 2 * h)),
    ("gru", lambda i, h: 3 * (i * h + h * h + 2 * h)),
    ("rnn", lambda i, h: i * h + h * h + 2 * h),
])
def test_shapes_and_parameter_counts(cell, per_layer):
    cfg = CharRNNConfig(vocab_size=11, cell=cell, n_layer=2, n_embd=8, n_hidden=12)
    m = CharRNN(cfg)
    expected = 11 * 8 + per_layer(8, 12) + per_layer(12, 12) + 12 * 11 + 11
    assert m.num_params() == expected
    idx = torch.randint(0, 11, (3, 5))
    logits, loss, state = m(idx, idx)
    assert logits.shape == (3, 5, 11) and loss.ndim == 0
    h = state[0] if isinstance(state, tuple) else state
    assert h.shape == (2, 3, 12)


def test_carried_state_equals_one_long_sequence():
    # two windows with the state carried between them score exactly what one window of both does
    torch.manual_seed(2)
    m = CharRNN(CharRNNConfig(vocab_size=9, n_embd=8, n_hidden=8))
    idx = torch.randint(0, 9, (2, 10))
    whole, _, _ = m(idx)
    first, _, state = m(idx[:, :6])
    second, _, _ = m(idx[:, 6:], state=state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)


def test_generate_is_seeded_and_extends_the_prompt():
    m = CharRNN(CharRNNConfig(vocab_size=9, cell="gru", n_embd=8, n_hidden=8)).eval()
    idx = torch.tensor([[1, 2, 3]])
    a = m.generate(idx, 7, top_k=3, generator=torch.Generator().manual_seed(0))
    b = m.generate(idx, 7, top_k=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 10) and torch.equal(a, b) and torch.equal(a[:, :3], idx)
    greedy = m.generate(idx, 4, temperature=0.0)
    logits, _, _ = m(greedy[:, :3])
    assert greedy[0, 3] == logits[0, -1].argmax()


@pytest.mark.parametrize("kwargs, match", [
    ({"cell": "transformer"}, "cell must be one of"),
    ({"n_hidden": 0}, "n_hidden must be a positive integer"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CharRNNConfig(**kwargs)
