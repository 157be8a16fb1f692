"""Stage II contrastive losses: hand-computed values, the CLIP cross-entropy oracle, gradcheck, and 2 processes == 1
(loss and DDP-averaged gradients of shared parameters) on gloo."""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from finevit_vl.train.contrastive_loss import (
    CONTRASTIVE_LOSSES,
    gather_with_grad,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
)


WORLD_SIZE = 2
GLOBAL_BATCH, IN_DIM, EMBED_DIM = 6, 5, 4

# Unit-norm rows; row i of IMAGES pairs with row i of TEXTS.
CASES = {
    "2x2": ([[1.0, 0.0], [0.6, 0.8]], [[0.8, 0.6], [0.0, 1.0]]),
    "3x2": ([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]], [[0.6, 0.8], [-1.0, 0.0], [0.8, -0.6]]),
}


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _sigmoid_by_hand(images: list[list[float]], texts: list[list[float]], scale: float, bias: float) -> float:
    total = 0.0
    for i, image in enumerate(images):
        for j, text in enumerate(texts):
            logit = _dot(image, text) * math.exp(scale) + bias
            label = 1.0 if i == j else -1.0
            total += math.log(1.0 + math.exp(-label * logit))  # -logsigmoid(label * logit)
    return total / len(images)


def _softmax_by_hand(images: list[list[float]], texts: list[list[float]], scale: float) -> float:
    temperature = min(math.exp(scale), 100.0)
    logits = [[temperature * _dot(image, text) for text in texts] for image in images]
    batch = len(images)
    image_ce = sum(-logits[i][i] + math.log(sum(math.exp(logits[i][j]) for j in range(batch))) for i in range(batch))
    text_ce = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(batch))) for j in range(batch))
    return 0.5 * (image_ce / batch + text_ce / batch)


@pytest.mark.parametrize("case", sorted(CASES))
def test_losses_match_hand_computation(case):
    """Both losses equal an explicit per-pair Python computation, with a nonzero temperature and bias; the
    registry maps the config names to these functions."""
    images, texts = CASES[case]
    scale, bias = math.log(3.0), -1.5
    got = sigmoid_contrastive_loss(torch.tensor(images), torch.tensor(texts), torch.tensor(scale), torch.tensor(bias))
    assert got.item() == pytest.approx(_sigmoid_by_hand(images, texts, scale, bias), rel=1e-6)
    got = softmax_contrastive_loss(torch.tensor(images), torch.tensor(texts), torch.tensor(math.log(7.0)))
    assert got.item() == pytest.approx(_softmax_by_hand(images, texts, math.log(7.0)), rel=1e-6)
    assert CONTRASTIVE_LOSSES == {"sigmoid": sigmoid_contrastive_loss, "softmax": softmax_contrastive_loss}


def test_softmax_loss_matches_cross_entropy_and_clamps_temperature():
    """CLIP loss == mean of row- and column-wise cross-entropy of the full matrix; exp(logit_scale) is clamped at
    100, so a larger scale gives the same loss and no gradient to the scale."""
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    logits = math.exp(2.5) * images @ texts.T
    targets = torch.arange(5)
    expected = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    torch.testing.assert_close(softmax_contrastive_loss(images, texts, torch.tensor(2.5)), expected)

    scale = torch.tensor(math.log(1000.0), requires_grad=True)
    clamped = softmax_contrastive_loss(images, texts, scale)
    torch.testing.assert_close(clamped, softmax_contrastive_loss(images, texts, torch.tensor(math.log(100.0))))
    clamped.backward()
    assert scale.grad.item() == 0.0


def test_sigmoid_loss_is_symmetric_and_upcasts_to_fp32():
    """Swapping images and texts transposes the logits and keeps the loss (labels are symmetric); bf16 inputs are
    computed and returned in fp32."""
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-3.0)
    loss = sigmoid_contrastive_loss(images, texts, scale, bias)
    torch.testing.assert_close(sigmoid_contrastive_loss(texts, images, scale, bias), loss)
    half = sigmoid_contrastive_loss(images.bfloat16(), texts.bfloat16(), scale.bfloat16(), bias.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(loss.item(), rel=2e-2)


def test_gradcheck_float64():
    """Analytic gradients w.r.t. embeddings, logit_scale and logit_bias match finite differences (float64 path)."""
    torch.manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    images, texts = leaf(3, 4), leaf(3, 4)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    assert sigmoid_contrastive_loss(images, texts, scale, bias).dtype == torch.float64
    assert torch.autograd.gradcheck(sigmoid_contrastive_loss, (images, texts, scale, bias))
    assert torch.autograd.gradcheck(softmax_contrastive_loss, (images, texts, scale))


def test_gather_with_grad_is_identity_without_process_group():
    features = torch.randn(3, 4)
    assert gather_with_grad(features) is features


def _build_model() -> tuple[torch.nn.ModuleDict, torch.Tensor, torch.Tensor]:
    """Shared parameters (same init on every rank) and the fixed global batch of raw inputs, float64."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {"image_proj": torch.nn.Linear(IN_DIM, EMBED_DIM), "text_proj": torch.nn.Linear(IN_DIM, EMBED_DIM)}
    ).double()
    model.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))
    model.logit_bias = torch.nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
    image_inputs = torch.randn(GLOBAL_BATCH, IN_DIM, dtype=torch.float64)
    text_inputs = torch.randn(GLOBAL_BATCH, IN_DIM, dtype=torch.float64)
    return model, image_inputs, text_inputs


def _loss(name: str, model: torch.nn.ModuleDict, image_inputs: torch.Tensor, text_inputs: torch.Tensor):
    images = F.normalize(model["image_proj"](image_inputs), dim=-1)
    texts = F.normalize(model["text_proj"](text_inputs), dim=-1)
    if name == "sigmoid":
        return sigmoid_contrastive_loss(images, texts, model.logit_scale, model.logit_bias)
    return softmax_contrastive_loss(images, texts, model.logit_scale)


def _worker(rank: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        local = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        for name in CONTRASTIVE_LOSSES:
            model, image_inputs, text_inputs = _build_model()
            share = _loss(name, model, image_inputs[local], text_inputs[local])
            total = share.detach().clone()
            dist.all_reduce(total)
            (share * WORLD_SIZE).backward()
            grads = {}
            for param_name, param in model.named_parameters():
                if param.grad is None:  # softmax has no bias: DDP would skip it on every rank
                    continue
                dist.all_reduce(param.grad)
                grads[param_name] = param.grad / WORLD_SIZE  # what DDP's gradient averaging does
            results[name] = {"loss": total, "grads": grads}
        try:
            gather_with_grad(torch.zeros(3 - rank, EMBED_DIM))
        except ValueError as error:
            results["mismatch_error"] = str(error)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_processes_equal_one(tmp_path):
    """On 2 gloo processes, each with half of the global batch: the shares sum to the 1-process loss of the global
    batch, and after backward(share * world_size) the rank-averaged gradients of the shared projection weights and of
    logit_scale / logit_bias equal the 1-process gradients, for both losses; mismatched batch sizes raise ValueError
    on every rank."""
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=True)  # raises if a child fails
    for rank in range(WORLD_SIZE):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for name in CONTRASTIVE_LOSSES:
            model, image_inputs, text_inputs = _build_model()
            expected = _loss(name, model, image_inputs, text_inputs)
            expected.backward()
            torch.testing.assert_close(results[name]["loss"], expected.detach(), rtol=0, atol=1e-9)
            expected_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
            assert results[name]["grads"].keys() == expected_grads.keys()
            for param_name, grad in expected_grads.items():
                torch.testing.assert_close(results[name]["grads"][param_name], grad, rtol=0, atol=1e-9)
        assert "same feature shape on every rank" in results["mismatch_error"]
        assert "[(3, 4), (2, 4)]" in results["mismatch_error"]
