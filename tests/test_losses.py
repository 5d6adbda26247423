"""Loss functions and schedules against hand-computed values."""

import math

import pytest
import torch

from sequnlearn.errors import UserError
from sequnlearn.unlearn import losses
from sequnlearn.config import layer_order
from sequnlearn.unlearn.schedule import coefficients, progress


def test_random_target_ce_hand_computed():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]])
    targets = torch.tensor([2, 0])
    # token 0: uniform → -log(1/4) = log 4; token 1: p(0) = 3/6 → -log(1/2) = log 2
    expected = (math.log(4) + math.log(2)) / 2 / math.log(4)
    assert losses.random_target_ce(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_uniform_read_out_gives_one_and_zero():
    logits = torch.zeros(5, 7)
    assert losses.random_target_ce(logits, torch.arange(5)).item() == pytest.approx(1.0, rel=1e-6)
    assert losses.max_entropy(logits).item() == pytest.approx(0.0, abs=1e-7)


def test_max_entropy_hand_computed():
    logits = torch.tensor([[math.log(2.0), 0.0]])  # p = (2/3, 1/3)
    kl = -math.log(2) - 0.5 * (math.log(2 / 3) + math.log(1 / 3))
    assert losses.max_entropy(logits).item() == pytest.approx(kl / math.log(2), rel=1e-6)


def test_l2_retain_hand_computed_and_masked():
    mask = torch.tensor([[1, 1, 0]])
    orig = [torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)]
    cur = [torch.tensor([[[3.0, 4.0], [0.0, 0.0], [100.0, 100.0]]]),  # norms 5, 0 (pad ignored)
           torch.tensor([[[1.0, 0.0], [0.0, 2.0], [100.0, 0.0]]])]  # norms 1, 2
    expected = ((5 + 0) / 2 + (1 + 2) / 2) / 2
    assert losses.l2_retain(cur, orig, mask).item() == pytest.approx(expected)


def test_kl_retain_hand_computed():
    orig = torch.tensor([[math.log(3.0), 0.0]])  # p_o = (3/4, 1/4)
    cur = torch.tensor([[0.0, 0.0]])  # p_c = (1/2, 1/2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert losses.kl_retain(cur, orig).item() == pytest.approx(kl, rel=1e-6)
    assert losses.kl_retain(orig, orig).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("p, forget, retain", [(0.0, 50.0, 0.0), (0.5, 43.75, 2.5), (1.0, 37.5, 5.0)])
def test_coefficient_ramps(p, forget, retain):
    assert coefficients(p, 50.0, 5.0) == pytest.approx((forget, retain))


def test_progress_spans_zero_to_one():
    assert [progress(s, 5) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert progress(0, 1) == 0.0


def test_layer_order_reference_schedule():
    assert layer_order(28, 16, 4) == [28, 24, 20, 16]
    assert layer_order(7, 4, 1) == [7, 6, 5, 4]
    with pytest.raises(UserError, match="back to front"):
        layer_order(16, 28, 4)
    with pytest.raises(UserError, match="positive"):
        layer_order(28, 16, 0)


def test_topk_entropy_hand_computed():
    # the 2 largest of [3, 1, 0, 2] are 3 and 2: q = softmax([3, 2]) = [e/(e+1), 1/(e+1)]
    logits = torch.tensor([[3.0, 1.0, 0.0, 2.0]], requires_grad=True)
    q = [math.e / (math.e + 1), 1 / (math.e + 1)]
    kl = -math.log(2) - (math.log(q[0]) + math.log(q[1])) / 2  # KL(uniform_2 ‖ q)
    loss = losses.topk_entropy(logits, 2)
    assert loss.item() == pytest.approx(kl / math.log(2), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    # d/d top-k logits: (softmax_k − 1/k) / log k; the other two logits get none
    want = [(q[0] - 0.5) / math.log(2), 0.0, 0.0, (q[1] - 0.5) / math.log(2)]
    torch.testing.assert_close(grad[0], torch.tensor(want), rtol=1e-5, atol=1e-7)
    flat_top = torch.tensor([[5.0, 5.0, 5.0, -9.0]])  # the top 3 equal: at the maximum entropy
    assert losses.topk_entropy(flat_top, 3).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.topk_entropy(flat_top, 4).item() > 0.1  # the fourth is far below


def test_topk_entropy_is_a_forget_loss_of_the_engine(tmp_path):
    from sequnlearn.config import load_config
    from sequnlearn.errors import UserError
    from sequnlearn.runs import RunDir, read_jsonl
    from sequnlearn.unlearn.engine import unlearn

    run = unlearn(load_config(preset="tiny", overrides=["forget_loss=topk_entropy", "forget_top_k=16"]),
                  RunDir(tmp_path / "r"))
    lines = read_jsonl(run.metrics)
    assert lines and all(0 <= x["forget_loss"] < 1 for x in lines) and run.is_finished()
    with pytest.raises(UserError, match="forget_top_k 1000 is above the model's vocabulary"):
        unlearn(load_config(preset="tiny", overrides=["forget_loss=topk_entropy", "forget_top_k=1000"]),
                RunDir(tmp_path / "r2"))
    assert not (tmp_path / "r2").exists()
    with pytest.raises(UserError, match="forget_top_k must be >= 2"):
        load_config(preset="tiny", overrides=["forget_top_k=1"])


def test_token_logprob_and_next_token_nll_hand_computed():
    # p = (3/4, 1/4), (1/2, 1/2), (1/5, 4/5)
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, math.log(4.0)]])
    logp = losses.token_logprob(logits, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(logp, torch.tensor([math.log(0.25), math.log(0.5), math.log(0.8)]))
    # the third position is a row's last token (weight 0): it must not count, in the sum or the count
    nll = losses.next_token_nll(logp, torch.tensor([1.0, 1.0, 0.0]))
    assert nll.item() == pytest.approx(-(math.log(0.25) + math.log(0.5)) / 2, rel=1e-6)


def test_npo_hand_computed_per_token_and_per_sequence():
    beta = 0.5
    cur = torch.tensor([-1.0, -2.0, -0.5, -3.0, -9.0], requires_grad=True)
    orig = torch.tensor([-2.0, -1.0, -0.5, -1.0, -1.0])
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])  # positions 2 and 4 end their rows
    rows = torch.tensor([0, 0, 0, 1, 1])
    r_tok = [1.0, -1.0, -2.0]  # log π_cur − log π_orig at the weighted positions

    def term(r):
        return math.log(1 / (1 + math.exp(beta * r)))  # log σ(−β r)

    want_tok = -(2 / beta) * sum(term(r) for r in r_tok) / 3
    got = losses.npo(cur, orig, beta, weight)
    assert got.item() == pytest.approx(want_tok, rel=1e-6)
    (grad,) = torch.autograd.grad(got, cur)  # dL/dr = 2·σ(β r) / count > 0: lowering π_cur lowers the loss
    want = [2 / (1 + math.exp(-beta * r)) / 3 for r in r_tok]
    torch.testing.assert_close(grad, torch.tensor([want[0], want[1], 0.0, want[2], 0.0]))
    want_seq = -(2 / beta) * (term(1.0 - 1.0) + term(-2.0)) / 2  # rows sum r over their weighted positions
    assert losses.npo(cur, orig, beta, weight, rows, 2).item() == pytest.approx(want_seq, rel=1e-6)
    same = losses.npo(orig, orig, beta, weight, rows, 3)  # a row without a weighted position does not count
    assert same.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_next_tokens_shift_by_one_and_stop_at_each_rows_end():
    from sequnlearn.unlearn.objective import next_token_counts, next_tokens

    batch = {"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    labels, weight, rows = next_tokens(batch)  # at the 5 real tokens, row order
    assert labels[weight.bool()].tolist() == [6, 7, 9]
    assert weight.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0] and rows.tolist() == [0, 0, 0, 1, 1]
    batch["index"] = torch.tensor([1, 2, 4])  # flat indices (row·4 + t) of a subset of the real tokens
    labels, weight, rows = next_tokens(batch)
    assert labels.tolist() == [7, 0, 9] and weight.tolist() == [1.0, 0.0, 1.0] and rows.tolist() == [0, 0, 1]
    assert next_token_counts([3, 2, 1]) == [2, 1, 0]
    assert next_token_counts([3, 2, 1], by_row=True) == [1, 1, 0]
    assert next_token_counts([3, 2], keep=[[2], [0]]) == [0, 1]


@pytest.mark.parametrize("bias", [False, True])
def test_fused_token_logprob_equals_the_plain_one_in_value_and_gradient(bias):
    torch.manual_seed(0)
    h = torch.randn(5, 4, requires_grad=True)
    head = torch.nn.Linear(4, 11, bias=bias).requires_grad_(False)
    labels = torch.tensor([3, 0, 10, 7, 3])
    coef = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])  # a vector output: each position's gradient weighted
    plain = losses.token_logprob(head(h), labels)
    fused = losses.token_logprob_from_hidden(h, head.weight, head.bias, labels, chunk_rows=2)
    torch.testing.assert_close(fused, plain)
    (g_plain,) = torch.autograd.grad((plain * coef).sum(), h)
    (g_fused,) = torch.autograd.grad((fused * coef).sum(), h)
    torch.testing.assert_close(g_fused, g_plain)


def test_filter_gradients_hand_computed():
    g_r = torch.tensor([1.0, -2.0, 3.0, 0.0, -1.0])
    g_f = torch.tensor([2.0, 1.0, -1.0, 5.0, -4.0])  # agree (product > 0) at elements 0 and 4 only
    both, n = losses.filter_gradients(g_r, g_f, "same_sign")
    assert both.tolist() == [3.0, 0.0, 0.0, 0.0, -5.0] and n.item() == 2
    asym, n = losses.filter_gradients(g_r, g_f, "same_sign_asymmetric")  # forget filtered, retain kept whole
    assert asym.tolist() == [3.0, -2.0, 3.0, 0.0, -5.0] and n.item() == 2
    with pytest.raises(ValueError, match="unknown gradient filter"):
        losses.filter_gradients(g_r, g_f, "sign")


def test_l2sp_hand_computed():
    deltas = [torch.tensor([[1.0, -2.0], [0.0, 3.0]]), torch.tensor([0.5])]
    assert losses.l2sp(deltas).item() == pytest.approx(1 + 4 + 9 + 0.25)
